"""Writes one length-prefixed gRPC frame holding an OIP v2 ModelInferRequest (FP32 [1,4]) for h2load.

    python grpc_body.py MODEL OUTFILE      (needs tritonclient[grpc], numpy)
"""
import struct
import sys

import numpy as np
from tritonclient.grpc import service_pb2

request = service_pb2.ModelInferRequest(model_name=sys.argv[1])
tensor = request.inputs.add()
tensor.name, tensor.datatype = "x", "FP32"
tensor.shape.extend([1, 4])
request.raw_input_contents.append(np.array([[1, 2, 3, 4]], dtype=np.float32).tobytes())
payload = request.SerializeToString()
with open(sys.argv[2], "wb") as out:
    out.write(struct.pack(">BI", 0, len(payload)) + payload)
