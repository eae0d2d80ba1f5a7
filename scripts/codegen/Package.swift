// swift-tools-version: 6.2
// Only used by scripts/generate-protos.sh to build the protoc plugins; nothing here ships.
import PackageDescription

let package = Package(
    name: "SidecarCodegen",
    dependencies: [
        .package(url: "https://github.com/apple/swift-protobuf", from: "1.39.0"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf", from: "2.4.1"),
    ],
    targets: [.target(name: "Empty", path: "Empty")]
)
