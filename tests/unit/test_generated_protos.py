"""The committed protobuf modules are exactly what scripts/gen_protos.sh generates."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "src" / "trustmesh" / "proto"


def test_generated_modules_are_current(tmp_path: Path) -> None:
    src = tmp_path / "src" / "trustmesh" / "proto"
    src.mkdir(parents=True)
    for proto in PROTO_DIR.glob("*.proto"):
        shutil.copy(proto, src / proto.name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for proto, plugin in (("agent.proto", "--grpc_python_out"),
                          ("workloadapi.proto", "--grpclib_python_out")):
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path / 'src'}",
             f"--python_out={tmp_path / 'src'}", f"--pyi_out={tmp_path / 'src'}",
             f"{plugin}={tmp_path / 'src'}", f"trustmesh/proto/{proto}"],
            check=True, env=env, capture_output=True)
    generated = sorted(p.name for p in src.iterdir() if not p.name.endswith(".proto"))
    assert generated, "protoc generated nothing"
    for name in generated:
        assert (src / name).read_text() == (PROTO_DIR / name).read_text(), (
            f"{name} is stale: run scripts/gen_protos.sh")
