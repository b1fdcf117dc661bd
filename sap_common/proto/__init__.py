"""Generated gRPC/protobuf code for the sap.v2 contract (do not edit; see proto/)."""
