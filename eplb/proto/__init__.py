"""The wire protocol: msgpack messages, versioned and validated. See :mod:`eplb.proto.messages`."""

from eplb.proto.messages import *  # noqa: F401,F403
from eplb.proto.messages import __all__  # noqa: F401
