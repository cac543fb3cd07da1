"""The cost model: how long a prefill, a pull and a host-tier load take, in one place.

Used by the planner's decisions (``planner/decide.py``) and by ``p2pkv bench trace``; the
connector and router are meant to call the same code. A :class:`Profile` gives the priors
(a named model on a named device, each number with its source); :class:`CostModel` answers
with the priors until measurements arrive, then with smoothed estimates: prefill speed per
prompt-length bucket (:class:`PrefillEstimator`) and, per peer, pull bandwidth and round trip
(:class:`LinkEstimator`). All times are seconds, sizes bytes, lengths tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from p2pkv.errors import ConfigError

DEFAULT_ALPHA = 0.2
"""Weight of a new measurement in the exponentially weighted averages."""


@dataclass(frozen=True, slots=True)
class PrefillCurve:
    """Prefill time of a prompt of ``x`` tokens: ``T(x) = overhead + x/rate + quad * x**2``
    (linear layers plus causal attention). Computing tokens after ``cached`` cached ones
    costs ``T(total) - T(cached)`` (plus the step overhead)."""

    tokens_per_s: float
    quad_s_per_token2: float = 0.0
    overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if self.tokens_per_s <= 0 or self.quad_s_per_token2 < 0 or self.overhead_s < 0:
            raise ConfigError("PrefillCurve needs a positive rate and no negative terms")

    def seconds(self, total: int, cached: int = 0) -> float:
        cached = min(max(0, cached), max(0, total - 1))  # vLLM always computes the last token
        new = total - cached
        return (self.overhead_s + new / self.tokens_per_s
                + self.quad_s_per_token2 * (total * total - cached * cached))

    def step_seconds(self, parts: Sequence[tuple[int, int]]) -> float:
        """One engine step computing, per request, the tokens ``[start, end)`` of its
        sequence (a prefill chunk, or one decode token): one overhead for the step."""
        return self.overhead_s + sum(
            (end - start) / self.tokens_per_s + self.quad_s_per_token2 * (end * end - start * start)
            for start, end in parts if end > start)

    def scaled(self, factor: float) -> PrefillCurve:
        """The same shape, ``factor`` times the time."""
        return PrefillCurve(self.tokens_per_s / factor, self.quad_s_per_token2 * factor,
                            self.overhead_s * factor)


@dataclass(frozen=True, slots=True)
class Link:
    """A transfer of ``n`` bytes takes ``rtt_s + n / bytes_per_s``."""

    bytes_per_s: float
    rtt_s: float = 0.0

    def __post_init__(self) -> None:
        if self.bytes_per_s <= 0 or self.rtt_s < 0:
            raise ConfigError("Link needs a positive bandwidth and a non-negative rtt")

    def seconds(self, nbytes: int) -> float:
        return self.rtt_s + nbytes / self.bytes_per_s


@dataclass(frozen=True, slots=True)
class Profile:
    """A model on a device: the cost model's priors and each instance's KV capacity."""

    name: str
    description: str
    kv_bytes_per_token: int
    prefill: PrefillCurve
    link: Link
    """Instance to instance (a pull)."""
    host_load: Link
    """Host store to the device's KV blocks (a local hit on the host tier)."""
    device_kv_tokens: int
    """KV tokens in the engine's own cache (vLLM's GPU blocks)."""
    host_kv_tokens: int
    """KV tokens in the instance's host store."""
    decode_s_per_token: float
    sources: tuple[tuple[str, str], ...] = ()
    """(field, where its number comes from), for the report."""

    def __post_init__(self) -> None:
        if min(self.kv_bytes_per_token, self.device_kv_tokens) <= 0 or self.host_kv_tokens < 0:
            raise ConfigError(f"profile {self.name}: sizes must be positive")


@dataclass(slots=True)
class Ewma:
    """Exponentially weighted mean; the first sample is taken as is."""

    alpha: float = DEFAULT_ALPHA
    value: float = math.nan
    count: int = 0

    def update(self, sample: float) -> float:
        self.value = sample if self.count == 0 else (
            self.alpha * sample + (1 - self.alpha) * self.value)
        self.count += 1
        return self.value


def length_bucket(tokens: int) -> int:
    """Prompt-length bucket: the power of two at or above ``tokens`` (at least 512)."""
    return max(512, 1 << max(0, tokens - 1).bit_length())


@dataclass(slots=True)
class PrefillEstimator:
    """Measured prefill speed per prompt-length bucket, as a ratio to the prior curve (so a
    measurement at one cached length corrects predictions at others of similar size)."""

    prior: PrefillCurve
    alpha: float = DEFAULT_ALPHA
    ratios: dict[int, Ewma] = field(default_factory=dict)

    def observe(self, total: int, cached: int, seconds: float) -> None:
        expected = self.prior.seconds(total, cached)
        if seconds > 0 and expected > 0:
            self.ratios.setdefault(length_bucket(total), Ewma(self.alpha)).update(
                seconds / expected)

    def observe_step(self, prompt_tokens: int, parts: Sequence[tuple[int, int]],
                     seconds: float) -> None:
        """One measured engine step (``PrefillCurve.step_seconds``'s parts), counted in the
        bucket of ``prompt_tokens`` (the longest prompt it prefilled). The connector measures
        its own steps; a whole prompt is many steps under chunked prefill."""
        expected = self.prior.step_seconds(parts)
        if seconds > 0 and expected > 0:
            self.ratios.setdefault(length_bucket(prompt_tokens), Ewma(self.alpha)).update(
                seconds / expected)

    def seconds(self, total: int, cached: int = 0) -> float:
        ratio = self.ratios.get(length_bucket(total))
        scale = ratio.value if ratio is not None else 1.0
        return self.prior.seconds(total, cached) * scale

    def tokens_per_s(self) -> dict[int, float]:
        """Measured full-prompt prefill speed by bucket (for metrics and ``p2pkv status``)."""
        return {b: b / (self.prior.seconds(b) * e.value) for b, e in sorted(self.ratios.items())}


@dataclass(slots=True)
class _PeerLink:
    rtt: Ewma
    bandwidth: Ewma


@dataclass(slots=True)
class LinkEstimator:
    """Per peer: smoothed round trip and bandwidth of real pulls; the prior until then."""

    prior: Link
    alpha: float = DEFAULT_ALPHA
    peers: dict[str, _PeerLink] = field(default_factory=dict)

    def observe(self, peer: str, nbytes: int, seconds: float, rtt_s: float | None = None) -> None:
        """One pull of ``nbytes`` that took ``seconds`` in all (``rtt_s``: its first reply)."""
        est = self.peers.get(peer)
        if est is None:
            est = self.peers[peer] = _PeerLink(Ewma(self.alpha), Ewma(self.alpha))
        if rtt_s is not None:
            est.rtt.update(rtt_s)
        rtt = est.rtt.value if est.rtt.count else self.prior.rtt_s
        if nbytes > 0 and seconds > rtt:
            est.bandwidth.update(nbytes / (seconds - rtt))

    def link(self, peer: str) -> Link:
        est = self.peers.get(peer)
        if est is None:
            return self.prior
        return Link(est.bandwidth.value if est.bandwidth.count else self.prior.bytes_per_s,
                    est.rtt.value if est.rtt.count else self.prior.rtt_s)


@dataclass(slots=True)
class _LinkFit:
    """Exponentially weighted least squares of ``seconds = rtt + bytes / bandwidth``."""

    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    count: int = 0
    last_at: float = 0.0


class FittedLinkEstimator:
    """Per peer: round trip and bandwidth fitted to real pulls of any sizes (a pull's time
    has a fixed part and a per-byte part; pulls of several sizes separate the two), for
    callers that cannot time a pull's first reply (the connector: a pull is one call).

    A peer's fit is used from ``min_samples`` pulls on and forgotten ``max_age_s`` after its
    last one (back to the prior): a peer measured slow once is tried again later, since a
    planner that skips its pulls would never measure it again. Pulls of one size only give
    the bandwidth under the prior's round trip (at most the pulls' mean time).
    Same ``link(peer)`` as :class:`LinkEstimator`."""

    def __init__(self, prior: Link, alpha: float = DEFAULT_ALPHA, *, min_samples: int = 1,
                 max_age_s: float = math.inf) -> None:
        self.prior = prior
        self.alpha = alpha
        self.min_samples = min_samples
        self.max_age_s = max_age_s
        self.peers: dict[str, _LinkFit] = {}

    def observe(self, peer: str, nbytes: int, seconds: float, rtt_s: float | None = None,
                *, now: float = 0.0) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        fit = self.peers.get(peer)
        if fit is None or now - fit.last_at > self.max_age_s:
            fit = self.peers[peer] = _LinkFit()
        keep = 1.0 - self.alpha if fit.count else 0.0
        x, y = float(nbytes), float(seconds)
        fit.w = fit.w * keep + 1.0
        fit.sx = fit.sx * keep + x
        fit.sy = fit.sy * keep + y
        fit.sxx = fit.sxx * keep + x * x
        fit.sxy = fit.sxy * keep + x * y
        fit.count += 1
        fit.last_at = now

    def expire(self, now: float) -> None:
        """Forget peers whose last pull is older than ``max_age_s``."""
        for peer in [p for p, f in self.peers.items() if now - f.last_at > self.max_age_s]:
            del self.peers[peer]

    def link(self, peer: str) -> Link:
        fit = self.peers.get(peer)
        if fit is None or fit.count < self.min_samples:
            return self.prior
        mx, my = fit.sx / fit.w, fit.sy / fit.w
        var = fit.sxx / fit.w - mx * mx
        if var > (0.25 * mx) ** 2:  # sizes spread enough to separate rtt from bandwidth
            slope = (fit.sxy / fit.w - mx * my) / var
            rtt = my - slope * mx
            if slope > 0 and 0 <= rtt < my:
                return Link(1.0 / slope, rtt)
        rtt = min(self.prior.rtt_s, 0.5 * my)
        return Link(mx / (my - rtt), rtt)

    def measured(self) -> dict[str, Link]:
        """The peers with a fit in use (for metrics and ``p2pkv status``)."""
        return {p: self.link(p) for p, f in sorted(self.peers.items())
                if f.count >= self.min_samples}


class CostModel:
    """Expected times for one instance: the profile's priors corrected by its measurements.
    ``links``: a per-peer estimator with :class:`LinkEstimator`'s ``link(peer)`` (default:
    a :class:`LinkEstimator` over the profile's link)."""

    def __init__(self, profile: Profile, *, alpha: float = DEFAULT_ALPHA,
                 links: LinkEstimator | FittedLinkEstimator | None = None) -> None:
        self.profile = profile
        self.prefill = PrefillEstimator(profile.prefill, alpha)
        self.links = links if links is not None else LinkEstimator(profile.link, alpha)

    def prefill_s(self, total: int, cached: int = 0) -> float:
        return self.prefill.seconds(total, cached)

    def pull_s(self, peer: str, tokens: int) -> float:
        return self.links.link(peer).seconds(tokens * self.profile.kv_bytes_per_token)

    def host_load_s(self, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        return self.profile.host_load.seconds(tokens * self.profile.kv_bytes_per_token)
