"""tritonclient.grpc, importable in the same process as KServe's SDK.

Both register the protocol's messages (package `inference`) in protobuf's default descriptor
pool, under different file names, and a pool refuses a name defined twice: whichever is
imported second fails. tritonclient.grpc is imported here with a pool of its own; its messages
and client work the same, since the wire format does not depend on the pool.
"""

import sys
from types import ModuleType

from google.protobuf import descriptor_pool


def tritonclient_grpc() -> ModuleType:
    loaded = sys.modules.get("tritonclient.grpc")
    if loaded is not None:
        return loaded
    own = descriptor_pool.DescriptorPool()
    default = descriptor_pool.Default
    descriptor_pool.Default = lambda: own  # the generated modules add their files to it
    try:
        import tritonclient.grpc
    finally:
        descriptor_pool.Default = default
    return sys.modules[tritonclient.grpc.__name__]
