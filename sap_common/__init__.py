"""Code shared by the SAP provider and user: wire codec, contract stubs, model splitting, errors."""

PROTOCOL_VERSION = 2  # the wire contract, proto package sap.v2 (proto/sap_common/proto/sap.proto)
