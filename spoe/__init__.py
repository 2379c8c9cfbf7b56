"""spoe: a sans-IO SPOP (HAProxy Stream Processing Offload Protocol) agent engine and its asyncio
adapter. `Connection` is the protocol; `Agent` serves it over TCP."""

from .connection import Connection, State
from .data import DataType, Int32, Int64, Uint32, Uint64
from .errors import LocalProtocolError, SpopError, Status
from .events import NEED_DATA, Closed, Event, Hello, Notify, NotifyAborted
from .frames import Action, FrameType, Message, SetVar, UnsetVar, VarScope
from .server import Agent, AgentStats, run

__all__ = [
    "NEED_DATA",
    "Action",
    "Agent",
    "AgentStats",
    "Closed",
    "Connection",
    "DataType",
    "Event",
    "FrameType",
    "Hello",
    "Int32",
    "Int64",
    "LocalProtocolError",
    "Message",
    "Notify",
    "NotifyAborted",
    "SetVar",
    "SpopError",
    "State",
    "Status",
    "Uint32",
    "Uint64",
    "UnsetVar",
    "VarScope",
    "run",
]
