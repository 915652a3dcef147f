"""Wire compatibility of the Konnectivity messages, checked against bytes derived by hand from the published field
numbers and enum values (proto3: a field's key is ``(number << 3) | wire type``; varints little-endian base 128;
default values are not written). It cannot pass by agreeing with itself: the expected bytes are written out here.

    PacketType: DIAL_REQ 0, DIAL_RSP 1, CLOSE_REQ 2, CLOSE_RSP 3, DATA 4, DIAL_CLS 5, DRAIN 6
    Packet: type 1; dialRequest 2, dialResponse 3, data 4, closeRequest 5, closeResponse 6, closeDial 7, drain 8
    DialRequest: protocol 1, address 2, random 3     DialResponse: error 1, connectID 2, random 3
    CloseRequest: connectID 1    CloseResponse: error 1, connectID 2    CloseDial: random 1
    Data: connectID 1, error 2, data 3
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy import konnectivity_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]

CASES = [
    # type 0 (DIAL_REQ) is the default: no key 0x08. 0x12 = field 2, length-delimited; inner: 0x0a "tcp",
    # 0x12 address (14 bytes), 0x18 varint 42.
    ("DIAL_REQ", pb.Packet(type=pb.DIAL_REQ, dialRequest=pb.DialRequest(protocol="tcp", address="10.0.0.1:10250",
                                                                        random=42)),
     "12 17 0a 03 746370 12 0e 31302e302e302e313a3130323530 18 2a"),
    # A negative random (int64) is a ten-byte varint.
    ("DIAL_REQ negative random", pb.Packet(dialRequest=pb.DialRequest(protocol="tcp", address="a:1", random=-1)),
     "12 15 0a 03 746370 12 03 613a31 18 ffffffffffffffffff01"),
    ("DIAL_RSP", pb.Packet(type=pb.DIAL_RSP, dialResponse=pb.DialResponse(connectID=7, random=42)),
     "08 01 1a 04 10 07 18 2a"),
    ("DIAL_RSP error", pb.Packet(type=pb.DIAL_RSP, dialResponse=pb.DialResponse(error="refused", random=42)),
     "08 01 1a 0b 0a 07 72656675736564 18 2a"),
    ("CLOSE_REQ", pb.Packet(type=pb.CLOSE_REQ, closeRequest=pb.CloseRequest(connectID=7)), "08 02 2a 02 08 07"),
    ("CLOSE_RSP", pb.Packet(type=pb.CLOSE_RSP, closeResponse=pb.CloseResponse(connectID=7)), "08 03 32 02 10 07"),
    ("CLOSE_RSP error", pb.Packet(type=pb.CLOSE_RSP, closeResponse=pb.CloseResponse(error="x", connectID=300)),
     "08 03 32 06 0a 01 78 10 ac02"),
    ("DATA", pb.Packet(type=pb.DATA, data=pb.Data(connectID=7, data=b"hi")), "08 04 22 06 08 07 1a 02 6869"),
    ("DATA error", pb.Packet(type=pb.DATA, data=pb.Data(connectID=1, error="e")), "08 04 22 05 08 01 12 01 65"),
    ("DIAL_CLS", pb.Packet(type=pb.DIAL_CLS, closeDial=pb.CloseDial(random=42)), "08 05 3a 02 08 2a"),
    ("DRAIN", pb.Packet(type=pb.DRAIN, drain=pb.Drain()), "08 06 42 00"),
]


@pytest.mark.parametrize(("name", "packet", "wire"), CASES, ids=[c[0] for c in CASES])
def test_each_packet_encodes_to_the_hand_derived_bytes(name: str, packet: pb.Packet, wire: str) -> None:
    expected = bytes.fromhex(wire.replace(" ", ""))
    assert packet.SerializeToString() == expected
    assert pb.Packet.FromString(expected) == packet


def test_the_service_path_is_what_kube_apiserver_calls() -> None:
    service = pb.DESCRIPTOR.services_by_name["ProxyService"]
    method = service.methods_by_name["Proxy"]
    assert pb.DESCRIPTOR.package == ""  # no package: the path is /ProxyService/Proxy
    assert method.client_streaming and method.server_streaming
    assert method.input_type.name == method.output_type.name == "Packet"


def test_the_committed_module_is_what_the_documented_command_generates(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    proto = ROOT / "proxy" / "konnectivity.proto"
    assert "python -m grpc_tools.protoc -I proxy --python_out=proxy --pyi_out=proxy" in proto.read_text()
    (tmp_path / "proxy").mkdir()
    (tmp_path / "proxy" / "konnectivity.proto").write_bytes(proto.read_bytes())
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "proxy", "--python_out=proxy",
                    "--pyi_out=proxy", "proxy/konnectivity.proto"], cwd=tmp_path, check=True, timeout=60)
    for name in ("konnectivity_pb2.py", "konnectivity_pb2.pyi"):
        assert (tmp_path / "proxy" / name).read_text() == (ROOT / "proxy" / name).read_text(), name
