"""The inference wing's contract: the decode plan recognises modules by exact type and leaves
anything else to the modules; a failed kernel build is one warning and the torch path; the
ctypes table agrees with the C prototypes; models/ and layers/ do not depend on the wing.

References: a no-cache argmax loop over the full forward (what greedy decoding must produce), the
same model decoded with the kernels switched off, and the C header itself.
"""

from __future__ import annotations

import ast
import ctypes
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_text_generate import reference_greedy  # the no-cache argmax reference, shared
from torch import nn

import mmafm
from mmafm.inference import build_plan, generate, kernel_linears, kernels_available, kernels_disabled, prefill
from mmafm.inference import kernels

ROOT = Path(__file__).resolve().parents[1]
needs_native = pytest.mark.skipif(not kernels_available(),
                                  reason=f"native kernels unavailable: {kernels.kernels_unavailable_reason()}")


class LoRALinear(nn.Module):
    """A LoRA adapter (Hu et al., 2021) around a linear: ``base(x) + scale * up(down(x))``."""

    def __init__(self, base: nn.Linear, rank: int = 4, scale: float = 2.0):
        super().__init__()
        self.base, self.scale = base, scale
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.up.weight, std=0.3)  # nonzero, so skipping the adapter shows
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.base(x) + self.scale * self.up(self.down(x))


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` subclass, as quantized linears are: int8-rounded weights per output row."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.abs().amax(dim=1, keepdim=True) / 127.0
        return F.linear(x, (self.weight / scale).round().clamp(-127, 127) * scale)


def _adapted_model():
    torch.manual_seed(0)
    model = mmafm.create_model("afm_2025_device_tiny", init_std=0.3, max_seq_len=64).eval()  # KV sharing
    model.layers[1].attn.q_proj = LoRALinear(model.layers[1].attn.q_proj)
    model.layers[6].attn.q_proj = LoRALinear(model.layers[6].attn.q_proj)  # a KV-shared layer
    w_up = model.layers[2].ffn.w_up
    quantized = FakeQuantLinear(w_up.in_features, w_up.out_features, bias=False)
    quantized.weight = w_up.weight
    model.layers[2].ffn.w_up = quantized
    return model


PROMPTS = [[5, 9, 2, 7, 1, 3], [4, 4, 8]]


@needs_native
def test_unrecognised_layers_take_the_module_path_and_decode_token_for_token():
    model = _adapted_model()
    with torch.no_grad():
        cache = model.new_cache(2, 20)
        model(torch.tensor([p[:3] for p in PROMPTS]), cache=cache)
        plan = build_plan(model, cache)
    assert not plan.whole_step
    layout = [(layer.attention, layer.ffn) for layer in plan.layers]
    want = [("kernel", "kernel")] * model.config.n_layers
    want[1] = want[6] = ("module", "kernel")
    want[2] = ("kernel", "module")
    assert layout == want
    assert "LoRALinear" in plan.layers[1].why and "FakeQuantLinear" in plan.layers[2].why
    assert plan.module_layers == [1, 2, 6]

    fast = generate(model, PROMPTS, 10)
    assert model.layers[1].attn.q_proj.calls > 10  # the adapter ran in every decode step
    with kernels_disabled():
        assert generate(model, PROMPTS, 10) == fast
    assert fast == [reference_greedy(model, p, 10) for p in PROMPTS]
    # the adapters matter: the plain model continues differently
    plain = mmafm.create_model("afm_2025_device_tiny", init_std=0.3, max_seq_len=64).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".down." not in k and ".up." not in k},
                          strict=False)
    for layer in (1, 6):
        plain.layers[layer].attn.q_proj.weight = model.layers[layer].attn.q_proj.base.weight
    assert [reference_greedy(plain, p, 10) for p in PROMPTS] != fast


@needs_native
def test_per_layer_kernels_equal_the_modules_around_an_adapter():
    model = _adapted_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        cache = model.new_cache(2, 12)
        model(ids[:, :4], cache=cache)
        plan = build_plan(model, cache)
        got = torch.stack([plan.step(ids[:, t]) for t in range(4, 12)], dim=1)  # (2, 8, V)
        want = model(ids)[:, 4:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_failed_build_is_one_warning_and_decoding_takes_the_torch_path(monkeypatch, tmp_path):
    missing = str(tmp_path / "no-such-cc")
    loader = kernels.KernelLoader(compiler=missing, cache_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="no-such-cc") as record:
        assert loader.get() is None
    assert len(record) == 1 and "not found" in loader.failure
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second use warns no more
        assert loader.get() is None

    monkeypatch.setattr(kernels, "_LOADER", loader)
    assert not kernels_available()
    model = mmafm.create_model("afm_2024_device_tiny", init_std=0.3, max_seq_len=32).eval()
    with torch.no_grad():
        cache = model.new_cache(1, 8)
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        plan = build_plan(model, cache)
    assert not plan.whole_step and "no native kernels" in plan.why and plan.module_layers == [0, 1, 2, 3]
    assert generate(model, PROMPTS, 6) == [reference_greedy(model, p, 6) for p in PROMPTS]


def test_the_compiler_comes_from_mmafm_cc_and_bad_flags_fail_cleanly(monkeypatch, tmp_path):
    monkeypatch.setenv("MMAFM_CC", "/nonexistent/bin/cc")
    with pytest.warns(RuntimeWarning, match="/nonexistent/bin/cc"):
        assert kernels.KernelLoader(cache_dir=tmp_path).get() is None
    monkeypatch.delenv("MMAFM_CC")
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here")
    with pytest.raises(kernels.KernelBuildError, match="failed"):
        kernels.build_library(flags=["--no-such-flag", "-shared", "-fPIC"], cache_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="--no-such-flag"):
        assert kernels.KernelLoader(flags=["--no-such-flag"], cache_dir=tmp_path).get() is None
    assert not list((tmp_path / "native").glob("*.so"))  # nothing half-built left behind


def _c_type(parameter: str):
    if "*" in parameter:
        return "pointer"
    return {"float": ctypes.c_float, "long": ctypes.c_long, "int": ctypes.c_int}[parameter.split()[-2]]


def test_symbol_table_matches_the_c_prototypes():
    header = re.sub(r"/\*.*?\*/", "", (kernels.CSRC / "api.h").read_text(), flags=re.S)
    prototypes = re.findall(r"\b(void|int)\s+(mmafm_\w+)\s*\(([^)]*)\)\s*;", header)
    assert [name for _, name, _ in prototypes] == list(kernels.SYMBOLS)
    for result, name, parameters in prototypes:
        restype, argtypes = kernels.SYMBOLS[name]
        assert restype == (None if result == "void" else ctypes.c_int), name
        parameters = [" ".join(p.split()) for p in parameters.split(",") if p.strip() != "void"]
        assert len(parameters) == len(argtypes), name
        for parameter, argtype in zip(parameters, argtypes):
            expected = _c_type(parameter)
            if expected == "pointer":
                assert argtype is ctypes.c_void_p or issubclass(argtype, ctypes._Pointer), (name, parameter)
            else:
                assert argtype is expected, (name, parameter)


@needs_native
def test_the_library_exports_every_symbol_of_the_table():
    library = kernels.kernels().library
    assert all(hasattr(library, symbol) for symbol in kernels.SYMBOLS)


def test_kernel_linears_route_bias_free_linears_and_leave_the_rest(monkeypatch):
    torch.manual_seed(1)
    plain, biased = nn.Linear(64, 32, bias=False), nn.Linear(64, 32)
    x = torch.randn(40, 64)  # prefill-sized
    routed = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda *args: routed.append(args[1].shape) or real(*args))
    with torch.no_grad():
        want_biased = biased(x)
        with kernel_linears():
            got, got_biased = plain(x), biased(x)
            F.linear(x[:2], plain.weight)  # a direct call (an adapter's) too
        plain(x)  # outside the block: torch's own call
    assert routed == [plain.weight.shape, plain.weight.shape]
    torch.testing.assert_close(got, F.linear(x, plain.weight), rtol=1e-5, atol=1e-5)
    assert torch.equal(got_biased, want_biased)  # a bias: torch's own call


def test_prefill_equals_the_plain_forward():
    torch.manual_seed(2)
    model = mmafm.create_model("afm_2025_device_tiny").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        got = prefill(model, model.new_cache(2, 9), ids)
        want = model(ids)[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _wing_imports(path: Path) -> list[tuple[str, str]]:
    """``(enclosing function or "<module>", imported module)`` of every import of mmafm.inference."""
    found = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else scope
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module:
                names = [child.module] + [f"{child.module}.{alias.name}" for alias in child.names]
            found.extend((scope, name) for name in names if name.startswith("mmafm.inference"))
            visit(child, inner)

    visit(ast.parse(path.read_text()), "<module>")
    return found


def test_models_and_layers_import_nothing_from_the_inference_wing():
    for path in sorted((ROOT / "mmafm" / "layers").glob("*.py")):
        assert _wing_imports(path) == [], path
    for path in sorted((ROOT / "mmafm" / "models").glob("*.py")):
        imports = _wing_imports(path)
        # only the multimodal model's convenience method calls the one decode loop, at call time
        assert all(scope == "generate" for scope, _ in imports) and (not imports or path.name == "multimodal.py"), \
            (path, imports)
