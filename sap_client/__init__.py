"""The SAP user side: runs the bottom blocks locally, keeps text and labels, trains through the provider."""
