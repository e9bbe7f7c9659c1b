"""``envoy.extensions.filters.network.dynamic_modules.v3.DynamicModuleNetworkFilter``, which
xds-protos does not ship: declared here from Envoy's API (fields 1-4) into protobuf's default
pool, so it packs into an ``Any`` and reads back from Envoy's config dump like any generated type."""

from __future__ import annotations

from envoy.extensions.dynamic_modules.v3 import dynamic_modules_pb2
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory

_PACKAGE = "envoy.extensions.filters.network.dynamic_modules.v3"
_FILE = "envoy/extensions/filters/network/dynamic_modules/v3/dynamic_modules.proto"


def _declare() -> type:
    pool = descriptor_pool.Default()
    try:
        descriptor = pool.FindMessageTypeByName(f"{_PACKAGE}.DynamicModuleNetworkFilter")
    except KeyError:
        F = descriptor_pb2.FieldDescriptorProto
        config = ".envoy.extensions.dynamic_modules.v3.DynamicModuleConfig"
        fields = [("dynamic_module_config", 1, F.TYPE_MESSAGE, config),
                  ("filter_name", 2, F.TYPE_STRING, ""),
                  ("filter_config", 3, F.TYPE_MESSAGE, ".google.protobuf.Any"),
                  ("terminal_filter", 4, F.TYPE_BOOL, "")]
        file = descriptor_pb2.FileDescriptorProto(
            name=_FILE, package=_PACKAGE, syntax="proto3",
            dependency=[dynamic_modules_pb2.DESCRIPTOR.name, any_pb2.DESCRIPTOR.name],
            message_type=[descriptor_pb2.DescriptorProto(name="DynamicModuleNetworkFilter", field=[
                F(name=n, number=num, type=t, label=F.LABEL_OPTIONAL, json_name=_camel(n), **_type_name(tn))
                for n, num, t, tn in fields])])
        pool.Add(file)
        descriptor = pool.FindMessageTypeByName(f"{_PACKAGE}.DynamicModuleNetworkFilter")
    made: type = message_factory.GetMessageClass(descriptor)
    return made


def _type_name(name: str) -> dict[str, str]:
    return {"type_name": name} if name else {}


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(w.title() for w in rest)


DynamicModuleNetworkFilter = _declare()
