"""Generated gRPC/protobuf code for the sap.v1 contract (do not edit; see proto/)."""
