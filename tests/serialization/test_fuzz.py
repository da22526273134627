"""Malformed lowbit files: every one must be refused with one CheckpointError (a ValueError) that
names the file, never another exception, a crash or a tensor built from bad parts.

Each test draws edits of a valid file (``ser.quantized()``: one linear per tensor variant) from
one category; ``MALFORMED`` counts the files tried (printed at the end of the run, and checked
against ``MIN_MALFORMED`` by the last test when the whole file ran). Random byte flips, which may
leave a valid file, are a separate property: a CheckpointError or a load, nothing else.
"""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.quantize import quantize_
from lowbit.serialization import FORMAT_VERSION, CheckpointError, load, read_state

MIN_MALFORMED = 2000


def fuzz(n: int) -> settings:
    """``n`` examples (the profile's derandomization kept); the fixtures used are read-only."""
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class _Valid:
    """One valid file's parts: ``tensors``, ``header`` (edit copies), its quantized ``keys`` and ``parts``, ``raw`` bytes."""

    def __init__(self, name: str, tensors: dict, header: dict, raw: bytes):
        self.name, self.tensors, self.header, self.raw = name, tensors, header, raw
        self.keys = sorted(k for k, e in header["entries"].items() if "alias" not in e)
        self.parts = sorted(k for k in tensors if ":" in k)
        self.layers = len(header["modules"])

    def copy(self) -> tuple[dict, dict]:
        return dict(self.tensors), copy.deepcopy(self.header)

    def __repr__(self) -> str:  # hypothesis prints the drawn file by name, not its bytes
        return f"<valid file {self.name}>"


@pytest.fixture(scope="module")
def base(ser, tmp_path_factory):
    """``files``: one single-linear file per config of ``ser.CONFIGS`` (small, so thousands are cheap to
    try); ``dir``: where the mutated files go."""
    d = tmp_path_factory.mktemp("fuzz")
    files = []
    for i, config in enumerate(ser.CONFIGS):
        torch.manual_seed(i)
        model = quantize_(ser.build(1), config)
        path = d / f"valid{i}.safetensors"
        tensors, header = ser.saved(model, path)
        files.append(_Valid(repr(config), tensors, header, path.read_bytes()))
    return types.SimpleNamespace(dir=d, files=files, __repr__=lambda: "base")


def _merged(a: _Valid, b: _Valid) -> _Valid:
    """``a`` and ``b`` in one file, ``b``'s layer renamed from 0 to 1."""
    tensors = dict(a.tensors)
    tensors.update({"1" + k[1:]: v for k, v in b.tensors.items()})
    header = copy.deepcopy(a.header)
    header["entries"].update({"1" + k[1:]: copy.deepcopy(e) for k, e in b.header["entries"].items()})
    header["modules"]["1"] = copy.deepcopy(b.header["modules"]["0"])
    return _Valid(f"{a.name} + {b.name}", tensors, header, b"")


def _file(data, base, where=None) -> _Valid:
    return data.draw(st.sampled_from([f for f in base.files if where is None or where(f)]))


def _rejected(ser, path, category: str, *, via_load: bool = False, layers: int = 1) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        if via_load:
            load(ser.build(layers, device="meta"), path)
        else:
            read_state([path])
    assert str(path) in str(info.value), info.value
    ser.MALFORMED[category] += 1
    return info.value


def _write(ser, base, tensors, header, name, raw=None):
    return ser.write(base.dir / f"{name}.safetensors", tensors, header, raw)


# --- the metadata as a whole ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@fuzz(150)
@given(data=st.data())
def test_garbage_metadata(ser, base, data):
    f = _file(data, base)
    valid = json.dumps(f.header)
    kind = data.draw(st.sampled_from(["text", "prefix", "nested", "json", "constant"]))
    if kind == "text":
        raw = data.draw(st.text(max_size=200))
    elif kind == "prefix":  # a strict prefix of a JSON object is never JSON
        raw = valid[: data.draw(st.integers(0, len(valid) - 1))]
    elif kind == "nested":
        raw = "[" * data.draw(st.integers(1, 200_000))
    elif kind == "json":  # any JSON that is not an object with exactly the three keys
        raw = json.dumps(data.draw(json_values.filter(lambda v: not isinstance(v, dict) or len(v) < 3)))
    else:
        raw = valid.replace('"format_version": 2', f'"format_version": {data.draw(st.sampled_from(["NaN", "Infinity"]))}')
    _rejected(ser, _write(ser, base, f.tensors, None, "garbage", raw), "metadata")


@fuzz(60)
@given(data=st.data(), version=st.one_of(st.integers().filter(lambda v: v not in (1, 2)), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=4), st.booleans(), st.none(), st.lists(st.integers(), max_size=2)))
def test_unknown_format_versions(ser, base, data, version):
    tensors, header = _file(data, base).copy()
    header["format_version"] = version
    err = _rejected(ser, _write(ser, base, tensors, header, "version"), "version")
    assert f"reads versions 1..{FORMAT_VERSION}" in str(err)


@fuzz(40)
@given(data=st.data())
def test_header_keys_and_types(ser, base, data):
    tensors, header = _file(data, base).copy()
    kind = data.draw(st.sampled_from(["drop", "extra", "entries", "modules"]))
    if kind == "drop":
        del header[data.draw(st.sampled_from(sorted(header)))]
    elif kind == "extra":
        header[data.draw(st.text(max_size=8).filter(lambda k: k not in header))] = data.draw(json_values)
    else:
        header[kind] = data.draw(json_values.filter(lambda v: not isinstance(v, dict)))
    _rejected(ser, _write(ser, base, tensors, header, "keys"), "header")


# --- one entry's JSON -------------------------------------------------------------------------------------

BAD_SHAPES = [[2**40, 2**40], [2**62], [10**30, 64], [-8, 64], [0, 64], [8, 0], [8.0, 64], [True, 64], ["8", 64], [],
              [[8], [64]], [8, 64, 1], [1, 8, 64], [8], [9, 64], [8, 65], [8, 128], [16, 64], [8, 63], [4, 64]]
BAD_DTYPES = ["complex64", "int4", "int8", "float8_e4m3fn", "uint8", "float64", "bool", "__import__", "Tensor", ""]


def _entry_edit(data, entry: dict, key: str) -> str:
    """Edit ``entry`` in place; returns the kind of edit."""
    kind = data.draw(st.sampled_from(["drop_key", "extra_key", "class", "shape", "dtype", "attributes", "tensors"]))
    if kind == "drop_key":
        del entry[data.draw(st.sampled_from(sorted(entry)))]
    elif kind == "extra_key":
        entry[data.draw(st.sampled_from(["kernel", "alias", "version", "x"]))] = data.draw(json_values)
    elif kind == "class":
        others = [c for c in ("Int8Tensor", "Int4Tensor", "Float8Tensor") if c != entry["class"]]
        entry["class"] = data.draw(st.sampled_from(others + ["Int3Tensor", "QuantizedTensor", "Tensor", ""])
                                   | json_values.filter(lambda v: not isinstance(v, str)))
    elif kind == "shape":
        entry["shape"] = data.draw(st.sampled_from(BAD_SHAPES) | json_values.filter(lambda v: not isinstance(v, list)))
    elif kind == "dtype":
        entry["dtype"] = data.draw(st.sampled_from([{"__dtype__": n} for n in BAD_DTYPES]
                                                   + [{"__qdtype__": "int8"}, "float32", {"__dtype__": "float32", "x": 1}])
                                   | json_values)
    elif kind == "attributes":
        attrs = entry["attributes"]
        what = data.draw(st.sampled_from(["drop", "kernel", "spec_null", "spec_garbage", "spec_field", "spec_type",
                                          "granularity", "act_garbage", "not_dict"]))
        if what == "drop":
            del attrs[data.draw(st.sampled_from(sorted(attrs)))]
        elif what == "kernel":
            attrs["kernel"] = data.draw(st.sampled_from([{"__enum__": "KernelPreference", "value": "auto"}, "auto", None]))
        elif what == "spec_null":
            attrs["spec"] = None
        elif what == "spec_garbage":
            attrs["spec"] = data.draw(json_values | st.just({"__class__": "Int8WeightOnlyConfig"}))
        elif what == "spec_field":
            attrs["spec"][data.draw(st.sampled_from(["kernel", "group_size", "x", "__enum__"]))] = data.draw(json_values)
        elif what == "spec_type":
            field = data.draw(st.sampled_from(["dtype", "symmetric", "eps", "scale_dtype", "zero_point_domain",
                                               "zero_point_dtype", "quant_min", "quant_max"]))
            attrs["spec"][field] = data.draw(  # 1 and 0 equal True and False but are not bools
                st.sampled_from(["8", 8.5, True, 1, 0, {"__dtype__": "complex64"}, {"__qdtype__": "int3"}, -1, 1e300,
                                 1e999, {"__tuple__": [1]}, [1]])
                .filter(lambda v: v != attrs["spec"][field] or type(v) is not type(attrs["spec"][field])))
        elif what == "granularity":
            attrs["spec"]["granularity"] = data.draw(st.sampled_from(
                [{"__class__": "PerGroup", "group_size": g} for g in (0, -32, 3, 16, 32, 48, 128, 512)]
                + [{"__class__": "PerAxis", "axis": 0}, {"__class__": "PerBlock", "block": {"__tuple__": [1, 32]}},
                   {"__class__": "PerTensor"}, {"__class__": "PerRow"}, {"__class__": "PerToken"},
                   {"__class__": "PerChannel"}, {"__class__": "PerGroup"}, {"__class__": "PerGroup", "group_size": "32"}]
            ).filter(lambda g: g != attrs["spec"]["granularity"]))
        elif what == "act_garbage":
            attrs["act_spec"] = data.draw(json_values.filter(lambda v: v is not None)
                                          | st.sampled_from([{"__class__": "QuantSpec"}, {"__class__": "PerToken"}]))
        else:
            entry["attributes"] = data.draw(json_values.filter(lambda v: not isinstance(v, dict)))
    else:
        tensors = entry["tensors"]
        what = data.draw(st.sampled_from(["drop", "unknown", "duplicate", "optional", "not_list"]))
        if what == "drop":
            tensors.pop(data.draw(st.integers(0, len(tensors) - 1)))
        elif what == "unknown":
            tensors.append(data.draw(st.sampled_from(["foo", "kernel", "spec", "QDATA", ""])))
        elif what == "duplicate":
            tensors.append(data.draw(st.sampled_from(tensors)))
        elif what == "optional":  # listed, allowed for the class, but not stored
            missing = [p for p in ("act_pre_scale", "zero_point", "act_scale", "act_zero_point") if p not in tensors]
            tensors.append(data.draw(st.sampled_from(missing)))
        else:
            entry["tensors"] = data.draw(json_values.filter(lambda v: not isinstance(v, list)))
    return kind


@fuzz(500)
@given(data=st.data())
def test_entry_json(ser, base, data):
    f = _file(data, base)
    tensors, header = f.copy()
    key = data.draw(st.sampled_from(f.keys))
    kind = _entry_edit(data, header["entries"][key], key)
    if kind != "attributes" and data.draw(st.booleans()):  # no module config to disagree with: the schema alone
        del header["modules"]["0"]
    _rejected(ser, _write(ser, base, tensors, header, "entry"), "entry")


# --- the stored parts ------------------------------------------------------------------------------------

ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
              torch.int32, torch.int64, torch.float8_e4m3fn, torch.float8_e5m2, torch.bool]


@fuzz(200)
@given(data=st.data())
def test_part_dtypes(ser, base, data):
    f = _file(data, base)
    tensors, header = f.copy()
    part = data.draw(st.sampled_from(f.parts))
    dtype = data.draw(st.sampled_from([d for d in ALL_DTYPES if d != tensors[part].dtype]))
    tensors[part] = tensors[part].to(dtype)
    _rejected(ser, _write(ser, base, tensors, header, "dtype"), "part dtype")


def _reshaped(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "drop_first":
        return t[1:]
    if how == "drop_last_col":
        return t[..., :-1] if t.dim() > 1 else t[:-1]
    if how == "append_row":
        return torch.cat([t, t[:1]])
    if how == "unsqueeze":
        return t.unsqueeze(0)
    if how == "squeeze":
        return t.reshape(-1) if t.dim() > 1 else t.reshape(1, -1, 1)
    if how == "transpose":
        return t.t() if t.dim() == 2 else t.reshape(-1, 1)
    return torch.cat([t, t], dim=-1)  # "double_last"


@fuzz(200)
@given(data=st.data())
def test_part_shapes(ser, base, data):
    f = _file(data, base)
    tensors, header = f.copy()
    part = data.draw(st.sampled_from(f.parts))
    how = data.draw(st.sampled_from(["drop_first", "drop_last_col", "append_row", "unsqueeze", "squeeze", "transpose",
                                     "double_last"]))
    new = _reshaped(tensors[part], how)
    if new.shape == tensors[part].shape:
        how = "append_row"
        new = _reshaped(tensors[part], how)
    tensors[part] = new
    _rejected(ser, _write(ser, base, tensors, header, "shape"), "part shape")


@fuzz(120)
@given(data=st.data())
def test_missing_and_stray_parts(ser, base, data):
    f = _file(data, base)
    tensors, header = f.copy()
    kind = data.draw(st.sampled_from(["drop_part", "stray_part", "stray_key", "drop_entry", "drop_plain"]))
    via_load = False
    if kind == "drop_part":
        del tensors[data.draw(st.sampled_from(f.parts))]
    elif kind == "stray_part":
        key = data.draw(st.sampled_from(f.keys))
        tensors[f"{key}:{data.draw(st.sampled_from(['foo', 'act_pre_scale', 'act_zero_point', 'kernel']))}"] = torch.ones(1)
    elif kind == "stray_key":
        tensors[data.draw(st.sampled_from(["0.bias:scale", "x:qdata", "9.weight:qdata", ":"]))] = torch.ones(1)
    elif kind == "drop_entry":
        del header["entries"][data.draw(st.sampled_from(f.keys))]
    else:  # the file lacks a float tensor the model has: refused by load (strict)
        del tensors[data.draw(st.sampled_from(sorted(k for k in tensors if ":" not in k)))]
        via_load = True
    _rejected(ser, _write(ser, base, tensors, header, "missing"), "missing or stray part", via_load=via_load)


# --- values ------------------------------------------------------------------------------------------------


def _has(*names):
    return lambda f: any(p.rpartition(":")[2] in names for p in f.parts)


def _value_part(data, base, names, where=lambda t: True) -> tuple[_Valid, str]:
    f = _file(data, base, lambda f: any(p.rpartition(":")[2] in names and where(f.tensors[p]) for p in f.parts))
    return f, data.draw(st.sampled_from([p for p in f.parts if p.rpartition(":")[2] in names and where(f.tensors[p])]))


@fuzz(300)
@given(data=st.data())
def test_bad_values(ser, base, data):
    kind = data.draw(st.sampled_from(["scale", "zero_point", "act_zero_point", "float8"]))
    if kind == "scale":
        f, part = _value_part(data, base, ("scale", "act_scale", "act_pre_scale"))
        value = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -1e-3, -5.0]))
    elif kind == "zero_point":
        f, part = _value_part(data, base, ("zero_point",))
        if f.tensors[part].dtype == torch.float32:  # float-domain zero point: any finite value is allowed
            value = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        else:  # int4's uint4 zero points live in [0, 15]
            value = data.draw(st.integers(-128, 127).filter(lambda v: not 0 <= v <= 15))
    elif kind == "act_zero_point":
        f, part = _value_part(data, base, ("act_zero_point",))
        value = data.draw(st.integers(-2**31, 2**31 - 1).filter(lambda v: not -128 <= v <= 127))
    else:
        f, part = _value_part(data, base, ("qdata",), lambda t: t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2))
        bits = {torch.float8_e4m3fn: [0x7F, 0xFF], torch.float8_e5m2: [0x7C, 0xFC, 0x7D, 0x7E, 0xFF]}[f.tensors[part].dtype]
        value = data.draw(st.sampled_from(bits))
    tensors, header = f.copy()
    t = tensors[part].clone()
    flat = t.view(torch.uint8).reshape(-1) if kind == "float8" else t.reshape(-1)
    flat[data.draw(st.integers(0, flat.numel() - 1))] = value
    tensors[part] = t
    _rejected(ser, _write(ser, base, tensors, header, "values"), "bad value")


# --- group sizes -------------------------------------------------------------------------------------------


@fuzz(100)
@given(data=st.data())
def test_bad_group_sizes(ser, base, data):
    """A consistent file (parts, spec and config all agree) with a group size the kernels don't take."""
    f = _file(data, base, lambda f: f.header["entries"]["0.weight"]["attributes"]["spec"]["granularity"]
              .get("__class__") == "PerGroup")
    tensors, header = f.copy()
    key = "0.weight"
    entry = header["entries"][key]
    k = ser.IN
    if entry["class"] == "Int4Tensor":
        g = data.draw(st.sampled_from([1, 2, 4, 8, 16, 48, 96, 128, 256]))
    else:
        g = data.draw(st.sampled_from([3, 5, 7, 24, 48, 96, 128]))
    n_groups = max(k // g, 1)
    for p in ("scale", "zero_point"):
        if f"{key}:{p}" in tensors:
            t = tensors[f"{key}:{p}"]
            tensors[f"{key}:{p}"] = t[:, :1].expand(t.shape[0], n_groups).contiguous()
    entry["attributes"]["spec"]["granularity"] = {"__class__": "PerGroup", "group_size": g}
    module = header["modules"]["0"]
    if data.draw(st.booleans()):  # no module config (whose own check would refuse g): the schema alone
        del header["modules"]["0"]
    elif "group_size" in module:
        module["group_size"] = g
    else:
        module["granularity"] = {"__class__": "PerGroup", "group_size": g}
    err = _rejected(ser, _write(ser, base, tensors, header, "group"), "group size")
    assert str(g) in str(err)


# --- swapped keys ------------------------------------------------------------------------------------------


@fuzz(150)
@given(data=st.data())
def test_swapped_keys(ser, base, data):
    """Two layers (two different configs) in one file, with their entries, parts or configs swapped."""
    i, j = data.draw(st.lists(st.integers(0, len(base.files) - 1), min_size=2, max_size=2, unique=True))
    f = _merged(base.files[i], base.files[j])
    tensors, header = f.copy()
    kind = data.draw(st.sampled_from(["entries", "parts", "modules"]))
    if kind == "entries":
        e = header["entries"]
        e["0.weight"], e["1.weight"] = e["1.weight"], e["0.weight"]
    elif kind == "parts":  # two parts that differ in dtype or shape (equal ones would be an undetectable edit)
        a = data.draw(st.sampled_from(f.parts))
        others = [p for p in f.parts if (tensors[p].dtype, tensors[p].shape) != (tensors[a].dtype, tensors[a].shape)]
        b = data.draw(st.sampled_from(others))
        tensors[a], tensors[b] = tensors[b], tensors[a]
    else:
        mods = header["modules"]
        mods["0"], mods["1"] = mods["1"], mods["0"]
    _rejected(ser, _write(ser, base, tensors, header, "swap"), "swapped")


# --- module configs -------------------------------------------------------------------------------------------


@fuzz(250)
@given(data=st.data())
def test_module_configs(ser, base, data):
    f = _file(data, base)
    tensors, header = f.copy()
    mods = header["modules"]
    fqn = "0"
    c = mods[fqn]
    kind = data.draw(st.sampled_from(["class", "unknown_field", "kernel", "required", "type", "not_config", "nested",
                                      "orphan", "mismatch", "granularity", "static_value"]))
    if kind == "class":
        c["__class__"] = data.draw(st.sampled_from(["Int3WeightOnlyConfig", "QuantConfig", "StaticQuantConfig",
                                                    "SmoothQuantConfig", "", "object"]) | json_values)
    elif kind == "unknown_field":
        c[data.draw(st.sampled_from(["x", "group", "bits", "version", "__enum__"]))] = data.draw(json_values)
    elif kind == "kernel":  # a run-time choice: not part of a format-2 file
        c["kernel"] = {"__enum__": "KernelPreference", "value": "auto"}
    elif kind == "required":
        mods[fqn] = {"__class__": "Int8StaticActivationInt8WeightConfig"}
    elif kind == "type":
        field = data.draw(st.sampled_from([f for f in c if f != "__class__"] or ["group_size"]))
        c[field] = data.draw(st.sampled_from(["32", 32.5, 32.0, 1, 0, None, [32], {"__dtype__": "float32"},
                                              {"__class__": "PerRow"}, 1e999, -1])
                             .filter(lambda v: v != c.get(field) or type(v) is not type(c.get(field))))
    elif kind == "not_config":
        mods[fqn] = data.draw(st.sampled_from([{"__class__": "QuantSpec", "dtype": {"__qdtype__": "int8"}},
                                               {"__class__": "PerRow"}, {"__dtype__": "float32"}, None, 3, "int8wo"])
                              | json_values)
    elif kind == "nested":  # hundreds of levels: JSON parses them, a recursive decoder would hit Python's limit
        depth = data.draw(st.sampled_from([9, 60, 200, 300, 400, 500, 650, 800]))
        raw = ('{"__class__": "QATConfig", "base_config": ' * depth + '{"__class__": "Int8WeightOnlyConfig"}'
               + ', "step": "convert"}' * depth)
        mods[fqn] = "NESTED"
        text = json.dumps(header).replace('"NESTED"', raw)
        _rejected(ser, _write(ser, base, tensors, None, "module", text), "module config")
        return
    elif kind == "orphan":  # a config for a module whose weight is not a quantized tensor of the file
        mods[data.draw(st.sampled_from(["", "99", "0.weight", "0.bias", "x.y"]))] = c
    elif kind == "mismatch":  # decodes, but is not the config the weight was quantized with
        other = _file(data, base, lambda o: o.header["modules"]["0"] != c)
        mods[fqn] = copy.deepcopy(other.header["modules"]["0"])
    elif kind == "static_value":  # a static config whose act_scale / act_zero_point are not the stored ones
        f = _file(data, base, lambda f: "act_scale" in f.header["modules"]["0"])
        tensors, header = f.copy()
        c = header["modules"]["0"]
        field = data.draw(st.sampled_from([k for k in ("act_scale", "act_zero_point") if c.get(k) is not None]))
        c[field] = data.draw(st.sampled_from([0.5, 1.0, 0.0125]) if field == "act_scale" else st.integers(-128, 127)
                             .filter(lambda v: v != c[field]))
    else:
        c["granularity"] = data.draw(st.sampled_from([{"__class__": "PerGroup", "group_size": 7},
                                                      {"__class__": "PerAxis", "axis": "0"}, {"__class__": "PerBlock"},
                                                      {"__class__": "PerGroup", "group_size": 0}]))
    _rejected(ser, _write(ser, base, tensors, header, "module"), "module config")


@fuzz(60)
@given(data=st.data())
def test_bad_aliases(ser, base, data):
    tensors, header = _file(data, base).copy()
    e = header["entries"]
    kind = data.draw(st.sampled_from(["missing", "chain", "extra", "type", "stored"]))
    if kind == "missing":
        e["0.bias_alias"] = {"alias": data.draw(st.sampled_from(["nope", "0.weight:qdata", "", "0.weight.x"]))}
    elif kind == "chain":
        e["a"] = {"alias": "0.bias"}
        e["b"] = {"alias": "a"}
    elif kind == "extra":
        e["a"] = {"alias": "0.bias", "class": "Int8Tensor"}
    elif kind == "type":
        e["a"] = {"alias": data.draw(json_values.filter(lambda v: not isinstance(v, str)))}
    else:
        e["0.bias"] = {"alias": "1.bias"}
    _rejected(ser, _write(ser, base, tensors, header, "alias"), "alias")


# --- bytes ----------------------------------------------------------------------------------------------------


@fuzz(200)
@given(data=st.data())
def test_truncated_files(ser, base, data):
    raw = _file(data, base).raw
    n = data.draw(st.integers(0, len(raw) - 1))
    path = base.dir / "truncated.safetensors"
    path.write_bytes(raw[:n])
    _rejected(ser, path, "truncated")


@fuzz(100)
@given(data=st.data())
def test_byte_flips_load_or_raise_checkpoint_error(ser, base, data):
    """Flipped bytes may leave a valid file (a changed weight value); the only allowed failure is CheckpointError."""
    raw = bytearray(_file(data, base).raw)
    header_len = int.from_bytes(raw[:8], "little")
    region = data.draw(st.sampled_from(["header", "data"]))
    lo, hi = (8, 8 + header_len) if region == "header" else (8 + header_len, len(raw))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(lo, hi - 1))] ^= data.draw(st.integers(1, 255))
    path = base.dir / "flipped.safetensors"
    path.write_bytes(bytes(raw))
    try:
        read_state([path])
    except CheckpointError as e:
        assert str(path) in str(e)


# --- checkpoint directories ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama (int4 MLPs, int8 attention) saved with save_pretrained: one shard."""
    transformers = pytest.importorskip("transformers")
    from lowbit.configs import Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig
    from lowbit.pretrained import save_pretrained

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                      max_position_embeddings=32, tie_word_embeddings=False,
                                      architectures=["LlamaForCausalLM"])
    model = transformers.LlamaForCausalLM(config).eval()
    quantize_(model, {"re:.*mlp.*": Int4WeightOnlyConfig(group_size=32),
                      "re:.*self_attn.*": Int8DynamicActivationInt8WeightConfig()})
    return save_pretrained(model, tmp_path_factory.mktemp("llama") / "q")


def _shard_edit(kind: str, tensors: dict, header: dict) -> None:
    key = "model.layers.0.mlp.up_proj.weight"
    if kind == "nan scale":
        tensors[f"{key}:scale"] = tensors[f"{key}:scale"].clone().index_fill_(1, torch.tensor([0]), float("nan"))
    elif kind == "int4 group 16":
        for p in ("scale", "zero_point"):
            tensors[f"{key}:{p}"] = tensors[f"{key}:{p}"].repeat_interleave(2, dim=1).contiguous()
        header["entries"][key]["attributes"]["spec"]["granularity"]["group_size"] = 16
    elif kind == "huge shape":
        header["entries"][key]["shape"] = [2**40, 2**40]
    elif kind == "kernel field":
        header["modules"]["model.layers.0.mlp.up_proj"]["kernel"] = {"__enum__": "KernelPreference", "value": "auto"}
    elif kind == "unknown class":
        header["entries"][key]["class"] = "Int3Tensor"
    elif kind == "missing part":
        del tensors[f"{key}:zero_point"]
    elif kind == "zero point 16":
        tensors[f"{key}:zero_point"] = tensors[f"{key}:zero_point"].clone().fill_(16)
    else:  # "swapped parts"
        other = "model.layers.0.self_attn.q_proj.weight"
        tensors[f"{key}:scale"], tensors[f"{other}:scale"] = tensors[f"{other}:scale"], tensors[f"{key}:scale"]


SHARD_EDITS = ["nan scale", "int4 group 16", "huge shape", "kernel field", "unknown class", "missing part",
               "zero point 16", "swapped parts", "truncated"]


@pytest.mark.parametrize("kind", SHARD_EDITS)
def test_from_pretrained_refuses_a_bad_shard(ser, llama_dir, tmp_path, kind):
    """The same clear errors through lowbit.from_pretrained (and checkpoint_info), naming the shard."""
    import shutil

    from lowbit.pretrained import checkpoint_info, from_pretrained

    d = tmp_path / "q"
    shutil.copytree(llama_dir, d)
    shard = d / json.loads((d / "config.json").read_text())["lowbit"]["shards"][0]
    if kind == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    else:
        tensors, header = ser.read_parts(shard)
        _shard_edit(kind, tensors, header)
        ser.write(shard, tensors, header)
    # checkpoint_info reads metadata only: it sees every problem but bad values
    for call in (from_pretrained,) if kind in ("nan scale", "zero point 16") else (from_pretrained, checkpoint_info):
        with pytest.raises(CheckpointError) as info:
            call(d)
        assert str(shard) in str(info.value), info.value
    ser.MALFORMED["checkpoint dir"] += 1


@pytest.mark.parametrize("shards", [["../valid0.safetensors"], ["/etc/passwd"], [3], "lowbit-00001-of-00001.safetensors",
                                    []])
def test_from_pretrained_refuses_shard_names_outside_the_directory(llama_dir, tmp_path, shards):
    import shutil

    from lowbit.pretrained import from_pretrained

    d = tmp_path / "q"
    shutil.copytree(llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["lowbit"]["shards"] = shards
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: lowbit"):
        from_pretrained(d)


def test_the_suite_tried_enough_malformed_files(ser):
    """Runs last: when every fuzz category ran, at least MIN_MALFORMED files were tried."""
    categories = {"metadata", "version", "header", "entry", "part dtype", "part shape", "missing or stray part",
                  "bad value", "group size", "swapped", "module config", "alias", "truncated", "checkpoint dir"}
    if not categories <= set(ser.MALFORMED):
        pytest.skip(f"only some fuzz categories ran ({sorted(ser.MALFORMED)})")
    assert sum(ser.MALFORMED.values()) >= MIN_MALFORMED, dict(ser.MALFORMED)
