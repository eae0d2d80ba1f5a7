// Empty: the package exists to build its dependencies' protoc plugins.
