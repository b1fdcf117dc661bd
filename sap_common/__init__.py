"""Code shared by the SAP provider and user: wire codec, contract stubs, model splitting, errors."""

PROTOCOL_VERSION = 1
