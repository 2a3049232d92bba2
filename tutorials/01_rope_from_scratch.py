# %% [markdown]
# # 1. RoPE from scratch, and the relative-position identity
#
# **What you will learn**
#
# * how rotary position embedding (RoPE) turns a position into a rotation, built by hand
#   from eq. (1) and (3) of [The math](../concepts/math.md), and checked against
#   `lazyattention.reference.rotate`;
# * the two pairings used by real models (NeoX "rotate-half" and GPT-J "interleaved");
# * the property the whole project rests on: rotations compose, and a query–key score
#   depends only on the *difference* of their positions (eq. 4), checked numerically;
# * why `apply_rope` and `rotate` differ (YaRN's attention factor, eq. 5).
#
# Everything runs on a CPU, and every claim is an `assert`.

# %%
import math

import matplotlib.pyplot as plt
import torch

import lazyattention.reference as la

torch.manual_seed(0)
generator = torch.Generator().manual_seed(0)

# %% [markdown]
# ## The frequencies (eq. 1)
#
# A head of dimension $D$ rotates its first $R \le D$ channels ("rotary dim") as $R/2$
# independent 2-D pairs. Pair $i$ turns by $\theta_i = \text{base}^{-2i/R}$ radians per
# position: fast for the first pairs, very slow for the last ones.

# %%
rope = la.RopeConfig(head_dim=8, base=10000.0)  # R = D = 8: four pairs
R = rope.rotary_dim
theta_by_hand = torch.tensor([rope.base ** (-2 * i / R) for i in range(R // 2)], dtype=torch.float64)
theta = la.inverse_frequencies(rope)
print("theta_i =", theta.tolist())
assert torch.equal(theta, theta_by_hand)

# %% [markdown]
# ## The rotation R(p) as a matrix (eq. 3)
#
# In the NeoX style (Llama, Qwen, Mistral) channel $i$ pairs with channel $i + R/2$;
# each pair is turned by the angle $p\,\theta_i$. Written as a $D \times D$ matrix:


# %%
def rope_matrix(p: int, theta: torch.Tensor, style: str) -> torch.Tensor:
    """The ``[R, R]`` block rotation R(p), built pair by pair (float64)."""
    r = 2 * theta.numel()
    m = torch.zeros(r, r, dtype=torch.float64)
    for i, t in enumerate(theta.tolist()):
        a, b = (i, i + r // 2) if style == "neox" else (2 * i, 2 * i + 1)
        c, s = math.cos(p * t), math.sin(p * t)
        m[a, a], m[a, b] = c, -s
        m[b, a], m[b, b] = s, c
    return m


x = torch.randn(R, dtype=torch.float64, generator=generator)
for style in ("neox", "interleaved"):
    styled = la.RopeConfig(head_dim=8, style=style)
    for p in (0, 1, 7, 1000, 65_537):
        by_hand = rope_matrix(p, theta, style) @ x
        by_library = la.rotate(x[None, :], torch.tensor([p]), styled)[0]
        assert torch.allclose(by_hand, by_library, atol=1e-12), (style, p)
print("rotate() == the hand-built matrix, both styles, positions up to 65,537")

# %% [markdown]
# A rotation keeps lengths, and turning by $p$ then by $-p$ (`conjugate=True`) is the
# identity:

# %%
m = rope_matrix(123, theta, "neox")
assert torch.allclose(m.T @ m, torch.eye(R, dtype=torch.float64), atol=1e-12)
x5 = torch.randn(5, 2, R, dtype=torch.float64, generator=generator)  # [T, H, D]
pos = torch.arange(5) * 1000
back = la.rotate(la.rotate(x5, pos, rope), pos, rope, conjugate=True)
assert torch.allclose(back, x5, atol=1e-12)

# %% [markdown]
# ## Rotations compose: R(a) R(b) = R(a + b) (eq. 4)

# %%
a = torch.randint(-(2**20), 2**20, (64,), generator=generator)
b = torch.randint(-(2**20), 2**20, (64,), generator=generator)
x64 = torch.randn(64, 1, R, dtype=torch.float64, generator=generator)
twice = la.rotate(la.rotate(x64, a, rope), b, rope)
once = la.rotate(x64, a + b, rope)
composition_error = (twice - once).abs().max().item()
print(f"max |R(b)R(a)x - R(a+b)x| = {composition_error:.2e} (float64, |a|, |b| < 2^20)")
# Not exactly 0: the angle p*theta is a float64 product, exact to |p*theta| * 2^-53,
# about 1e-10 rad at p = 2^20. That is the whole error budget of the rotation.
assert composition_error < 1e-9

# %% [markdown]
# ## The relative identity (eq. 4)
#
# $\langle R(a)q, R(b)k\rangle = \langle R(a-s)q, R(b-s)k\rangle$ for every shift $s$: the
# score of a query at $a$ and a key at $b$ only sees $a - b$. This is why a key can be
# stored rotated at one position (say its position inside a document, starting at 0)
# and used at another: rotate the *query* by the difference instead.


# %%
def score(q, a, k, b, rope):
    """``<R(a) q, R(b) k>`` for ``q, k [T, D]`` and integer positions ``a, b [T]``."""
    return (la.rotate(q[:, None], a, rope)[:, 0] * la.rotate(k[:, None], b, rope)[:, 0]).sum(-1)


T = 256
q = torch.randn(T, R, dtype=torch.float64, generator=generator)
k = torch.randn(T, R, dtype=torch.float64, generator=generator)
a = torch.randint(0, 2**20, (T,), generator=generator)
b = torch.randint(0, 2**20, (T,), generator=generator)
s = torch.randint(-(2**20), 2**20, (T,), generator=generator)
for style in ("neox", "interleaved"):
    styled = la.RopeConfig(head_dim=R, style=style)
    direct = score(q, a, k, b, styled)
    shifted = score(q, a - s, k, b - s, styled)
    relative = score(q, a - b, k, torch.zeros_like(b), styled)
    err = max((direct - shifted).abs().max().item(), (direct - relative).abs().max().item())
    print(f"{style:12s}: max score difference over {T} random (a, b, s) = {err:.2e}")
    assert err < 1e-9

# %% [markdown]
# A picture of the same fact: the score of one query and one key over every pair of
# positions $(a, b)$ in $0..63$. It is constant along each diagonal $a - b = $ const, so
# shifting both positions by any $s$ (moving along a diagonal) changes nothing.

# %%
grid = torch.arange(64)
qa, kb = q[:1].expand(64, R), k[:1].expand(64, R)
scores = torch.stack([score(qa, torch.full((64,), int(i)), kb, grid, rope) for i in grid])  # [a, b]
fig, ax = plt.subplots(figsize=(5.2, 4.4), layout="constrained")
image = ax.imshow(scores.numpy(), origin="lower", cmap="RdBu_r")
ax.set(xlabel="key position b", ylabel="query position a", title="⟨R(a)q, R(b)k⟩: constant along a − b")
fig.colorbar(image, ax=ax, shrink=0.8, label="score")
plt.show()
for d in (-20, 0, 17):  # every diagonal holds one value
    diagonal = torch.diagonal(scores, offset=d)
    assert (diagonal - diagonal[0]).abs().max() < 1e-9

# %% [markdown]
# The identity holds for the whole score, not just pair by pair, and for partial rotary
# too: channels past $R$ do not rotate at all, so they cannot break it.

# %%
partial = la.RopeConfig(head_dim=12, rotary_dim=8)
q12 = torch.randn(T, 12, dtype=torch.float64, generator=generator)
k12 = torch.randn(T, 12, dtype=torch.float64, generator=generator)
assert torch.allclose(score(q12, a, k12, b, partial), score(q12, a - s, k12, b - s, partial), atol=1e-9)
untouched = la.rotate(q12[:, None], a, partial)[:, 0, 8:]
assert torch.equal(untouched, q12[:, 8:])

# %% [markdown]
# ## `apply_rope` is `rotate` times the attention factor (eq. 5)
#
# Plain RoPE, linear and Llama-3 scaling only change the frequencies $\theta_i$, so the
# model's RoPE *is* the rotation. YaRN also multiplies the rotated channels by an
# attention factor $m$. The project keeps the two apart: `apply_rope` is what a model
# applies to fresh queries and keys; `rotate` is the pure rotation used to re-rotate an
# already-encoded key or to shift a query.

# %%
yarn = la.RopeConfig(head_dim=8, scaling=la.YarnScaling(factor=4.0, original_max_position=4096))
m_factor = yarn.attention_scaling
x1 = torch.randn(3, 1, 8, dtype=torch.float64, generator=generator)
p3 = torch.tensor([0, 5, 70_000])
assert torch.allclose(la.apply_rope(x1, p3, yarn), m_factor * la.rotate(x1, p3, yarn), atol=1e-12)
plain = la.RopeConfig(head_dim=8)
assert torch.equal(la.apply_rope(x1, p3, plain), la.rotate(x1, p3, plain))
print(f"YaRN factor 4: attention factor m = {m_factor:.4f}; plain RoPE: m = {plain.attention_scaling}")
assert m_factor > 1.0

# %% [markdown]
# ## Summary
#
# * RoPE is a block-diagonal rotation by $p\,\theta_i$; `lazyattention.reference.rotate`
#   equals the matrix built by hand, in both pairing styles.
# * Rotations compose and preserve length, so a score only depends on $a - b$: checked
#   to $10^{-9}$ in float64 (the float64 rounding of $p\,\theta_i$) at positions up to $2^{20}$.
# * Next: [tutorial 2](02_position_bound_caches.md) shows why an ordinary KV cache, which
#   stores keys *already rotated* at absolute positions, cannot simply be reused at
#   another offset.
