#!/usr/bin/env bash
# Regenerates the committed Swift and Python code for proto/sidecar/worker/v1/worker.proto, and the
# Swift code for the Open Inference Protocol v2 (proto/inference/grpc_predict_v2.proto) and the gRPC
# health protocol (proto/grpc/health/v1/health.proto) into Sources/SidecarOIPProtocol.
# The generated files are committed because building protoc and its plugins takes many minutes;
# run this only after editing the .proto.
#
#   scripts/generate-protos.sh
#
# Needs: a Python with pip (for grpcio-tools, which bundles protoc) and Swift (for the plugins).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

# grpcio-tools decides which protobuf/grpcio runtime the Python code needs: keep this version in step
# with the lower bounds in python/runtime-requirements.txt.
GRPCIO_TOOLS_VERSION="${GRPCIO_TOOLS_VERSION:-1.62.3}"
venv="$root/.build-codegen/venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import grpc_tools" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "grpcio-tools==$GRPCIO_TOOLS_VERSION"
fi

swift build -c release --package-path scripts/codegen --scratch-path "$root/.build-codegen" \
  --product protoc-gen-swift
swift build -c release --package-path scripts/codegen --scratch-path "$root/.build-codegen" \
  --product protoc-gen-grpc-swift-2
bin="$root/.build-codegen/release"

proto_file=sidecar/worker/v1/worker.proto

"$venv/bin/python" -m grpc_tools.protoc -I proto \
  --plugin=protoc-gen-swift="$bin/protoc-gen-swift" \
  --plugin=protoc-gen-grpc-swift="$bin/protoc-gen-grpc-swift-2" \
  --swift_out=Sources/SidecarWorkerProtocol --swift_opt=Visibility=Public,FileNaming=PathToUnderscores \
  --grpc-swift_out=Sources/SidecarWorkerProtocol \
  --grpc-swift_opt=Visibility=Public,Server=true,Client=true,FileNaming=PathToUnderscores \
  "$proto_file"

# Python: generate into the runtime package and make the grpc module's import package-relative.
out=python/sidecar_worker/proto
mkdir -p "$out"
"$venv/bin/python" -m grpc_tools.protoc -I proto \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" "$proto_file"
mv "$out/sidecar/worker/v1/worker_pb2.py" "$out/worker_pb2.py"
mv "$out/sidecar/worker/v1/worker_pb2.pyi" "$out/worker_pb2.pyi"
mv "$out/sidecar/worker/v1/worker_pb2_grpc.py" "$out/worker_pb2_grpc.py"
rm -rf "$out/sidecar"
sed -i 's/^from sidecar.worker.v1 import worker_pb2/from . import worker_pb2/' "$out/worker_pb2_grpc.py"
touch "$out/__init__.py"
echo "generated: Sources/SidecarWorkerProtocol/ and $out/"

# Open Inference Protocol v2 + gRPC health: Swift messages, server and client stubs.
oip_out=Sources/SidecarOIPProtocol
oip_protos=(inference/grpc_predict_v2.proto grpc/health/v1/health.proto)
mkdir -p "$oip_out"
"$venv/bin/python" -m grpc_tools.protoc -I proto \
  --plugin=protoc-gen-swift="$bin/protoc-gen-swift" \
  --plugin=protoc-gen-grpc-swift="$bin/protoc-gen-grpc-swift-2" \
  --swift_out="$oip_out" --swift_opt=Visibility=Public,FileNaming=PathToUnderscores \
  --grpc-swift_out="$oip_out" \
  --grpc-swift_opt=Visibility=Public,Server=true,Client=true,FileNaming=PathToUnderscores \
  "${oip_protos[@]}"
echo "generated: $oip_out/"
