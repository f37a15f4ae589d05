"""TensorBoard's Event / Summary protos (field numbers of tensorflow/core/util/event.proto and
tensorflow/core/framework/summary.proto), built with the protobuf library to decode the event files the
library writes by hand. Only the fields the library writes are declared."""
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from jaxpoison.train.tblog import read_records

F = descriptor_pb2.FieldDescriptorProto


def _messages():
    fd = descriptor_pb2.FileDescriptorProto(name="tb_test_event.proto", package="tbtest", syntax="proto3")
    summ = fd.message_type.add(name="Summary")
    val = summ.nested_type.add(name="Value")
    val.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    val.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
    summ.field.add(name="value", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                   type_name=".tbtest.Summary.Value")
    ev = fd.message_type.add(name="Event")
    ev.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    ev.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    ev.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    ev.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL, type_name=".tbtest.Summary")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tbtest.Event"))


Event = _messages()


def events(path) -> list:
    out = []
    for payload in read_records(path):
        e = Event()
        e.ParseFromString(payload)
        out.append(e)
    return out


def scalars(logdir) -> dict:
    """{tag: {step: value}} over every event file in ``logdir`` (one TensorBoard run)."""
    import pathlib
    out: dict = {}
    for f in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
        for e in events(f):
            for v in e.summary.value:
                steps = out.setdefault(v.tag, {})
                assert e.step not in steps, f"step {e.step} of {v.tag} written twice"
                steps[e.step] = v.simple_value
    return out
