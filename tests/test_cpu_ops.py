"""The compiled attention kernel for packed sequences (lmforge/model/cpu_ops.py) and the
C build helper under it (lmforge/io/native.py): values against PyTorch's attention, the model
path with and without it, and every way of falling back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lmforge.io import native
from lmforge.model import cpu_ops as na
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

needs_kernel = pytest.mark.skipif(not na.available() and not os.environ.get("CI"),
                                  reason=f"kernel not built here: {native.why_not(na.NAME)}")


def reference(qkv: torch.Tensor, lengths: list[int], h: int, hkv: int, d: int, causal: bool) -> torch.Tensor:
    """Sequence by sequence with PyTorch's scaled_dot_product_attention."""
    outs, start = [], 0
    for n in lengths:
        x = qkv[start:start + n, :(h + 2 * hkv) * d].reshape(n, h + 2 * hkv, d).transpose(0, 1)
        q, k, v = x[:h], x[h:h + hkv], x[h + hkv:]
        y = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=causal, enable_gqa=hkv != h)[0]
        outs.append(y.transpose(0, 1).reshape(n, h * d))
        start += n
    return torch.cat(outs)


@needs_kernel
@pytest.mark.parametrize("d", [16, 32, 64])
@pytest.mark.parametrize("hkv", [4, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_pytorch_attention(d, hkv, causal):
    torch.manual_seed(d + hkv + causal)
    h = 4
    lengths = [1, 2, 15, 16, 17, 33, 64, 5, 100]  # block edges of the kernel's 16-wide vectors and 4-query blocks
    extra = 3  # columns after q/k/v in each row are ignored
    qkv = torch.randn(sum(lengths), (h + 2 * hkv) * d + extra) * 2
    got = na.varlen_attention(qkv, na.offsets_of(lengths), h, hkv, d, causal=causal)
    assert got is not None
    torch.testing.assert_close(got, reference(qkv, lengths, h, hkv, d, causal), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_large_scores_and_written_into_out():
    # Scores in the hundreds: the softmax must subtract the row maximum (exp would overflow).
    torch.manual_seed(0)
    lengths = [7, 40]
    qkv = torch.randn(47, 3 * 2 * 32) * 8
    out = torch.full((47, 64), float("nan"))
    got = na.varlen_attention(qkv, na.offsets_of(lengths), 2, 2, 32, out=out)
    assert got is out and torch.isfinite(out).all()
    # Scores this large make float32 itself the limit: compare both float32 computations with
    # a float64 one; the kernel must be no further from it than PyTorch's own kernel is.
    exact = reference(qkv.double(), lengths, 2, 2, 32, False)
    ours = (out.double() - exact).abs().max().item()
    theirs = (reference(qkv, lengths, 2, 2, 32, False).double() - exact).abs().max().item()
    assert ours < 1e-3 and ours <= 2 * theirs + 1e-6, (ours, theirs)


@needs_kernel
def test_threads_do_not_change_values():
    torch.manual_seed(1)
    lengths = [9, 30, 30, 2, 61, 17]
    qkv = torch.randn(sum(lengths), 3 * 6 * 32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = na.varlen_attention(qkv, na.offsets_of(lengths), 6, 6, 32)
        torch.set_num_threads(2)
        two = na.varlen_attention(qkv, na.offsets_of(lengths), 6, 6, 32)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each (sequence, head) is computed whole by one thread


def test_declines_what_it_does_not_take():
    qkv = torch.randn(10, 3 * 2 * 32)
    off = na.offsets_of([4, 6])
    assert na.varlen_attention(qkv, off, 2, 2, 8) is None  # head size not a multiple of 16
    assert na.varlen_attention(qkv.double(), off, 2, 2, 32) is None
    assert na.varlen_attention(qkv.t().contiguous().t(), off, 2, 2, 32) is None  # columns not contiguous
    assert na.varlen_attention(torch.randn(600, 3 * 2 * 32), na.offsets_of([600]), 2, 2, 32) is None  # too long
    wants_grad = qkv.clone().requires_grad_()
    assert na.varlen_attention(wants_grad, off, 2, 2, 32) is None
    with torch.no_grad():
        assert (na.varlen_attention(wants_grad, off, 2, 2, 32) is not None) == na.available()


def tiny_encoder(causal: bool) -> Transformer:
    config = ModelConfig(vocab_size=50, n_embd=64, n_head=2, n_kv_head=2, n_layer=2, intermediate_size=128,
                         max_position_embeddings=128, position="learned", norm="layernorm", norm_position="post",
                         mlp="gelu", gelu_approximate="none", qkv_bias=True, out_bias=True, mlp_bias=True, causal=causal, type_vocab_size=2,
                         embedding_norm=True, lm_head=False)
    torch.manual_seed(3)
    return Transformer(config).eval()


@needs_kernel
@pytest.mark.parametrize("causal", [False, True])
def test_packed_encoder_same_with_and_without_the_kernel(causal):
    model = tiny_encoder(causal)
    lengths = [20, 5, 17, 17] if not causal else [9, 9, 9]  # a causal batch with padding keeps PyTorch's path
    ids = torch.randint(0, 50, (sum(lengths),))
    with torch.no_grad():
        fast = model.encode_packed(ids, lengths)
        na.ENABLED = False
        try:
            slow = model.encode_packed(ids, lengths)
        finally:
            na.ENABLED = True
        padded = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(padded)
        for i, (start, n) in enumerate(zip(na.offsets_of(lengths)[:-1].tolist(), lengths)):
            padded[i, :n], mask[i, :n] = ids[start:start + n], 1
        whole = model.encode(padded, mask)[mask.bool()]
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, whole, atol=1e-5, rtol=1e-5)


def test_build_failures_fall_back(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.c"
    bad.write_text("int f(void) { return undeclared; }\n")
    assert native.load("test-bad", bad) is None
    assert "compile failed" in native.why_not("test-bad") and "undeclared" in native.why_not("test-bad")
    assert native.load("test-missing", tmp_path / "absent.c") is None
    assert "missing" in native.why_not("test-missing")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    good = tmp_path / "good.c"
    good.write_text("int f(void) { return 7; }\n")
    assert native.load("test-nocc", good) is None and "no C compiler" in native.why_not("test-nocc")
    assert not (tmp_path / "cache" / "native").exists() or not any((tmp_path / "cache" / "native").glob("test-*.so"))


def test_builds_once_and_reloads(tmp_path, monkeypatch):
    if native._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    src = tmp_path / "seven.c"
    src.write_text("int seven(void) { return 7; }\n")
    lib = native.load("test-seven", src)
    assert lib is not None and lib.seven() == 7 and native.why_not("test-seven") is None
    built = list((tmp_path / "native").glob("test-seven-*.so"))
    assert len(built) == 1
    # A new process finds the built library and does not compile again.
    code = ("import sys, pathlib; from lmforge.io import native; "
            "native._compile = lambda *a: sys.exit('compiled again'); "
            f"print(native.load('test-seven', pathlib.Path({str(src)!r})).seven())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "LMFORGE_CACHE": str(tmp_path)})
    assert done.returncode == 0 and done.stdout.strip() == "7", done.stderr


@pytest.mark.slow  # seconds of the fast suite: run with the slow tests
def test_disabled_by_environment(tmp_path):
    code = ("from lmforge.model import cpu_ops as na; from lmforge.io import native; import torch; "
            "print(na.available(), native.why_not(na.NAME)); "
            "print(na.varlen_attention(torch.randn(4, 96), na.offsets_of([4]), 1, 1, 32))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "LMFORGE_NATIVE": "0", "LMFORGE_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["False disabled by LMFORGE_NATIVE=0", "None"]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


@needs_kernel
@pytest.mark.parametrize("d", [64, 24])  # vector and scalar loops
@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("pos", [37, 700])  # heads one after another; heads over the threads (T x H >= 4096)
def test_decode_step_equals_pytorch(d, rotary, pos):
    torch.manual_seed(d + rotary)
    h, hkv, max_len = 6, 2, 720
    kc, vc = torch.randn(hkv, max_len, d), torch.randn(hkv, max_len, d)
    k_before, v_before = kc.clone(), vc.clone()
    qkv = torch.randn((h + 2 * hkv) * d)
    rope = (torch.randn(d), torch.randn(d)) if rotary else None
    got = na.decode_attention(qkv, rope, kc, vc, pos, h, hkv, d)
    q, k, v = qkv.view(h + 2 * hkv, d).split((h, hkv, hkv))
    if rotary:
        q, k = rotate(q, *rope), rotate(k, *rope)
    torch.testing.assert_close(kc[:, pos], k, rtol=1e-6, atol=1e-6)  # the new key/value written at pos
    assert torch.equal(vc[:, pos], v)
    untouched = torch.ones(max_len, dtype=torch.bool)
    untouched[pos] = False
    assert torch.equal(kc[:, untouched], k_before[:, untouched]) and torch.equal(vc[:, untouched], v_before[:, untouched])
    want = F.scaled_dot_product_attention(q.view(1, h, 1, d), kc[None, :, :pos + 1], vc[None, :, :pos + 1],
                                          enable_gqa=True).reshape(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("h, hkv, d", [
    (6, 2, 64),    # three query heads a key head, read together
    (10, 2, 32),   # five a key head: a task of four and one of one
    (4, 4, 128),   # one a key head, widest vector case
    (6, 3, 24),    # scalar loops
    (2, 1, 272),   # heads wider than a task's buffer: one at a time, summed in place
])
def test_decode_rows_split_keys_equal_pytorch_and_each_row_alone(h, hkv, d):
    """Rows whose caches span one, several and a partial last part of keys: each row's output
    equals PyTorch's attention over its keys 0..pos, and equals bit for bit the same row decoded
    alone (a row's keys are split by its length, not by the batch)."""
    torch.manual_seed(h * d + hkv)
    positions = [4, 255, 256, 700, 1030, 511]
    batch, max_len = len(positions), 1040
    kc, vc = torch.randn(batch, hkv, max_len, d), torch.randn(batch, hkv, max_len, d)
    qkv = torch.randn(batch, 1, (h + 2 * hkv) * d)
    start = torch.tensor(positions)
    got = na.decode_attention_rows(qkv, None, kc, vc, start, h, hkv, d)
    assert got is not None
    for b, pos in enumerate(positions):
        q = qkv[b, 0, :h * d].view(1, h, 1, d)
        want = F.scaled_dot_product_attention(q, kc[b:b + 1, :, :pos + 1], vc[b:b + 1, :, :pos + 1],
                                              enable_gqa=True).reshape(-1)
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5)
        alone = na.decode_attention_rows(qkv[b:b + 1], None, kc[b:b + 1], vc[b:b + 1], pos, h, hkv, d)
        assert torch.equal(alone[0], got[b])


@needs_kernel
def test_decoder_steps_same_with_and_without_the_kernel():
    from lmforge.model.kv_cache import KVCache

    torch.manual_seed(4)
    config = ModelConfig(family="llama", vocab_size=64, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                         intermediate_size=96, max_position_embeddings=64, norm="rmsnorm", mlp="swiglu",
                         position="rope")
    model = Transformer(config).eval()
    ids = torch.randint(0, 64, (1, 12))

    def steps() -> torch.Tensor:
        cache = KVCache.for_model(config, 1, 16, torch.float32, "cpu")
        model(ids[:, :5], cache=cache, start=0)
        return torch.stack([model(ids[:, i:i + 1], cache=cache, start=i)[0, -1] for i in range(5, 12)])

    with torch.no_grad():
        fast = steps()
        na.ENABLED = False
        try:
            slow = steps()
        finally:
            na.ENABLED = True
        whole = model(ids)[0, 5:]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, whole, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("position", ["rope", "learned"])
def test_batched_decode_steps_rows_at_their_own_positions(position, count_calls):
    """Rows of different lengths decoded together (per-row positions, as the scheduler steps
    them) and in lockstep (one shared position): the batched kernel against PyTorch's path, and
    each row against its own batch-1 run."""
    from lmforge.model.kv_cache import KVCache

    torch.manual_seed(6)
    config = ModelConfig(family="llama", vocab_size=64, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                         intermediate_size=96, max_position_embeddings=64, norm="rmsnorm", mlp="swiglu",
                         position=position)
    model = Transformer(config).eval()
    lengths = [3, 9, 5, 14]
    seqs = [torch.randint(0, 64, (1, n + 4)) for n in lengths]
    calls = count_calls(na, "decode_attention_rows")

    def batched(lockstep: bool) -> torch.Tensor:
        cache = KVCache.for_model(config, len(seqs), 24, torch.float32, "cpu")
        starts = [min(lengths) if lockstep else n for n in lengths]
        for b, (seq, n) in enumerate(zip(seqs, starts)):
            model(seq[:, :n], cache=cache.rows(b, b + 1), start=0)
        out = []
        for step in range(4):
            ids = torch.stack([seq[0, n + step] for seq, n in zip(seqs, starts)]).view(-1, 1)
            start = starts[0] + step if lockstep else torch.tensor(starts) + step
            out.append(model(ids, cache=cache, start=start)[:, -1])
        return torch.stack(out, 1)

    with torch.no_grad():
        for lockstep in (False, True):
            calls.clear()
            fast = batched(lockstep)
            assert calls and all(calls)  # every step's attention went through the kernel
            na.ENABLED = False
            try:
                slow = batched(lockstep)
            finally:
                na.ENABLED = True
            torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
        for b, (seq, n) in enumerate(zip(seqs, lengths)):  # each row as if alone
            alone = model(seq[:, :n + 4])[0, n:n + 4]
            torch.testing.assert_close(batched(False)[b], alone, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("n", [576, 40])  # vector loop with no tail, and a tail
def test_rms_norm_rows_equal_pytorch(n):
    torch.manual_seed(n)
    x, w = torch.randn(3, n) * 5, torch.randn(n)
    got = na.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(got, F.rms_norm(x, (n,), w, 1e-5), rtol=1e-5, atol=1e-5)
    assert na.rms_norm(torch.randn(na.RMS_NORM_MAX_ROWS + 1, n), w, 1e-5) is None  # many rows: PyTorch's
    assert na.rms_norm(x.double(), w.double(), 1e-5) is None


@needs_kernel
def test_rms_norm_many_rows_equal_pytorch():
    torch.manual_seed(1)
    x, w = torch.randn(2, 300, 576) * 3, torch.randn(576)
    got = na.rms_norm_rows(x, w, 1e-6)
    torch.testing.assert_close(got, F.rms_norm(x, (576,), w, 1e-6), rtol=1e-5, atol=1e-5)
    assert na.rms_norm_rows(x[:, :, :100], w[:100], 1e-6) is None  # not contiguous


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary", [True, False])
def test_prefill_prepare_equals_rotation_cache_writes_and_casts(dtype, rotary):
    from lmforge.model.rope import apply_rotary

    torch.manual_seed(2)
    b, n, h, hkv, d, start = 2, 37, 6, 2, 32, 5
    qkv = torch.randn(b, n, (h + 2 * hkv) * d).to(dtype)
    angles = torch.randn(n, d)
    rope = (angles.cos()[None, None], angles.sin()[None, None]) if rotary else None
    kc, vc = torch.full((b, hkv, 50, d), 7.0), torch.full((b, hkv, 50, d), 7.0)
    q, k, v = na.prefill_prepare(qkv, rope, kc, vc, start, h, hkv, d)
    heads = qkv.float().view(b, n, h + 2 * hkv, d).transpose(1, 2)
    qk, v_ref = heads.split((h + hkv, hkv), dim=1)
    if rotary:
        qk = apply_rotary(qk, *rope)
    q_ref, k_ref = qk.split((h, hkv), dim=1)
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    assert q.shape == (b, h, n, d) and k.shape == v.shape == (b, hkv, n, d)
    # the rotation in float32 (up to its rounding), then rounded to bf16 as PyTorch rounds
    torch.testing.assert_close(kc[:, :, start:start + n], k_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(vc[:, :, start:start + n], v_ref)
    for got, want in ((q, q_ref), (k, k_ref), (v, v_ref)):
        assert (got.float() - want.bfloat16().float()).abs().max() <= 2 ** -7 * want.abs().max()
    assert torch.equal(v, v_ref.bfloat16())
    assert (kc[:, :, :start] == 7).all() and (kc[:, :, start + n:] == 7).all()  # nothing else written
    # without a cache: the same bf16 tensors
    q2, k2, v2 = na.prefill_prepare(qkv, rope, None, None, 0, h, hkv, d)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)
    assert na.prefill_prepare(qkv, rope, kc, vc, 20, h, hkv, d) is None  # positions past the cache
    assert na.prefill_prepare(qkv.double(), rope, None, None, 0, h, hkv, d) is None


@needs_kernel
def test_silu_mul_bf16_close_to_float32_and_handles_extremes():
    torch.manual_seed(3)
    h = (torch.randn(3, 17, 2 * 40) * 4).bfloat16()  # a vector part and a tail of 8
    h[0, 0, :4] = torch.tensor([-200.0, 200.0, 0.0, -1e-30])
    gate, up = h.float().chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = na.silu_mul_bf16(h)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 17, 40)
    assert torch.isfinite(got.float()).all()
    # one rounding to bf16 of the float32 value (2^-8 relative), plus the exponential's error
    assert ((got.float() - want).abs() <= 2 ** -8 * want.abs() + 1e-30).all()
    assert na.silu_mul_bf16(h.float()) is None and na.silu_mul_bf16(h[..., :79]) is None
