"""Generates the sidecar protocol's Python gRPC stubs from ``rollout.proto`` (``make proto``).

The stubs are committed so that neither users nor the GPU machines need grpcio-tools. Two version
gates that grpcio-tools writes into its output are relaxed afterwards: the generated code would
otherwise refuse to import under any protobuf / grpcio older than the generator's own, and the
sidecar must run inside SGLang's environment, which pins its own (older) grpcio and protobuf. The
code itself only uses APIs present since grpcio 1.66 and protobuf 5.26, the floors in setup.cfg.

``python -m conspo_jax.rollout.wire.gen_proto [--out DIR]`` writes into the package (default) or DIR.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import sys
import tempfile

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(PACKAGE_DIR)))  # the directory holding conspo_jax/
PACKAGE_REL = os.path.join("conspo_jax", "rollout", "wire")
PROTO_REL = os.path.join(PACKAGE_REL, "rollout.proto")
GENERATED = ("rollout_pb2.py", "rollout_pb2.pyi", "rollout_pb2_grpc.py")
MIN_GRPC_VERSION = "1.66.0"  # keep equal to setup.cfg's grpcio floor

_PB2_GATE = re.compile(
    r"from google\.protobuf import runtime_version as _runtime_version\n"
    r"|_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:.*\n)*?\)\n"
)
_GRPC_GATE = re.compile(r"GRPC_GENERATED_VERSION = '[^']*'")
_SERIALIZED = re.compile(r"AddSerializedFile\((b'.*?')\)", re.S)
_TOOL_VERSION = re.compile(r"# Protobuf Python Version: (\S+)")


def _relax_version_gates(name: str, text: str) -> str:
    if name == "rollout_pb2.py":
        text, n = _PB2_GATE.subn("", text)
        if n != 2:  # the generator changed shape: fail loudly instead of shipping a half edit
            raise RuntimeError(f"gen_proto: expected the protobuf runtime-version gate in {name}, found {n} parts")
    elif name == "rollout_pb2_grpc.py":
        text, n = _GRPC_GATE.subn(f"GRPC_GENERATED_VERSION = '{MIN_GRPC_VERSION}'", text)
        if n != 1:
            raise RuntimeError(f"gen_proto: expected GRPC_GENERATED_VERSION in {name}, found {n}")
    return text


def generate(out_dir: str = PACKAGE_DIR) -> list[str]:
    """Compiles rollout.proto and writes the three stub files into ``out_dir``; returns their paths."""
    import grpc_tools
    from grpc_tools import protoc  # only the generator needs grpcio-tools

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{REPO_ROOT}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                PROTO_REL,
            ]
        )
        if rc != 0:
            raise RuntimeError(f"gen_proto: protoc failed with exit code {rc} on {PROTO_REL}")
        os.makedirs(out_dir, exist_ok=True)
        written = []
        for name in GENERATED:
            with open(os.path.join(tmp, PACKAGE_REL, name)) as f:
                text = _relax_version_gates(name, f.read())
            dst = os.path.join(out_dir, name)
            with open(dst + ".tmp", "w") as f:
                f.write(text)
            shutil.move(dst + ".tmp", dst)
            written.append(dst)
    return written


def serialized_descriptor(pb2_source: str) -> bytes:
    """The FileDescriptorProto bytes embedded in a generated ``*_pb2.py`` (the protocol itself)."""
    m = _SERIALIZED.search(pb2_source)
    if m is None:
        raise ValueError("no AddSerializedFile(...) payload found in the _pb2 source")
    return ast.literal_eval(m.group(1))


def generator_version(pb2_source: str) -> str | None:
    m = _TOOL_VERSION.search(pb2_source)
    return m.group(1) if m else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=PACKAGE_DIR, help="output directory (default: the package)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
