"""The SAP provider: holds the top of the model, trains PEFT parameters and serves forward/backward RPCs."""
