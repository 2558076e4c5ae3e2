"""DP-aware rollout routing: send every turn of a multi-turn rollout to the data-parallel rank that holds its
KV/prefix cache, by consistent hashing with bounded loads.

What it is
    GLM-5's agentic RL serves over a thousand concurrent rollouts on data-parallel inference engines. A
    rollout is many turns (model, tool, model, ...); turn j + 1 resends the whole history of turn j. If it
    lands on the rank that served turn j, that rank's prefix cache already holds the history and only the new
    tokens are prefilled; anywhere else, the whole history is prefilled again. GLM-5 (glm5_spec.md
    section 8) maps a rollout ID to a fixed DP rank by consistent hashing, plus light dynamic rebalancing
    over the hash space. This file builds both parts:

    HashRing (Karger et al., STOC 1997)
        Every rank r puts V virtual nodes on a ring of 2^64 points, at h("rank:r:vnode:v"), v < V. A rollout
        id lands at h("rollout:" + str(id)) and belongs to the first virtual node clockwise. h is the first
        8 bytes of BLAKE2b, so the map is the same in every process, on every machine, at every run (Python's
        own hash() is salted per process and would not be). With V virtual nodes a rank's share of the ring is
        1/N with a relative spread of about 1/sqrt(V) (9 percent at V = 128). Adding a rank takes ids only
        from the others, about 1/(N+1) of them, all to the new rank; removing one moves only its own ids.

    RolloutRouter: bounded loads (Mirrokni, Thorup, Zadimoghaddam, SODA 2018) + stickiness
        Hashing alone lets an unlucky rank collect more than its share of the active rollouts. The router
        gives every rank a capacity c(m) = ceil((1 + eps) m / N), m = active rollouts counting the new one.
        A new rollout walks the ring from its point and takes the first rank whose load is below c(m); a
        rollout already placed stays where it is (sticky: its cache is there), whatever the loads.
        The bound:
          * a walk always ends: the other m - 1 rollouts fill at most m - 1 < N c(m) slots;
          * arrivals only: max load <= ceil((1 + eps) m / N) at all times, because each placement respects
            c at its time and c never decreases as m grows;
          * with departures, a rank can sit above the current c(m) (its rollouts stay, others finished); it
            then receives no new rollout until it drains below c(m). Nothing is migrated: moving a rollout
            would throw its cache away, which is the point of the routing.
        Smaller eps balances harder and sends more new rollouts past their hash rank (harmless: a new rollout
        has no cache yet; the walk is O(1/eps^2) ranks in expectation in the paper). eps=None turns the bound
        off (plain consistent hashing).

Choices where the paper is silent: the bounded-load scheme is ours (the paper names no scheme); V = 128 and
eps = 0.25 by default; ids are hashed through str(), so 7 and "7" are the same rollout.

Not handled: weighting ranks by capacity (give a bigger rank more virtual nodes), load measured in tokens
rather than rollouts, cache eviction on the engines, migration of running rollouts.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Iterator


def stable_hash(key: str) -> int:
    """A 64-bit hash of key, identical in every process and on every machine (BLAKE2b, first 8 bytes)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


def _rollout_key(rollout_id) -> str:
    if isinstance(rollout_id, bool) or not isinstance(rollout_id, (str, int)):
        raise TypeError(f"rollout_id: expected a str or an int, got {type(rollout_id).__name__}")
    return f"rollout:{rollout_id}"


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank: expected a non-negative integer, got {rank!r}")
    return rank


class HashRing:
    """Consistent hashing of rollout ids onto ranks, V virtual nodes per rank.

    ranks: a positive rank count N (ranks 0..N-1) or an iterable of distinct non-negative rank ids.
    """

    def __init__(self, ranks: int | Iterable[int], vnodes: int = 128):
        if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
            raise ValueError(f"HashRing vnodes: expected a positive integer, got {vnodes!r}")
        if isinstance(ranks, int) and not isinstance(ranks, bool):
            if ranks < 1:
                raise ValueError(f"HashRing ranks: expected a positive number of ranks, got {ranks}")
            ranks = range(ranks)
        ranks = [_check_rank(r) for r in ranks]
        if not ranks:
            raise ValueError("HashRing ranks: expected at least one rank, got none")
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"HashRing ranks: expected distinct rank ids, got {ranks}")
        self.vnodes = vnodes
        self._points: list[tuple[int, int]] = []  # sorted (position on the ring, rank)
        for r in ranks:
            self._insert(r)

    def _insert(self, rank: int) -> None:
        for v in range(self.vnodes):
            bisect.insort(self._points, (stable_hash(f"rank:{rank}:vnode:{v}"), rank))

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({r for _, r in self._points}))

    def add_rank(self, rank: int) -> None:
        if _check_rank(rank) in self.ranks:
            raise ValueError(f"HashRing.add_rank: rank {rank} is already on the ring")
        self._insert(rank)

    def remove_rank(self, rank: int) -> None:
        if rank not in self.ranks:
            raise ValueError(f"HashRing.remove_rank: rank {rank!r} is not on the ring (ranks {self.ranks})")
        if len(self.ranks) == 1:
            raise ValueError("HashRing.remove_rank: cannot remove the last rank")
        self._points = [pr for pr in self._points if pr[1] != rank]

    def walk(self, rollout_id) -> Iterator[int]:
        """The distinct ranks met clockwise from the id's point; the first is ``rank_of(rollout_id)``."""
        start = bisect.bisect_right(self._points, (stable_hash(_rollout_key(rollout_id)), -1))
        seen: set[int] = set()
        n = len(self._points)
        for i in range(n):
            r = self._points[(start + i) % n][1]
            if r not in seen:
                seen.add(r)
                yield r

    def rank_of(self, rollout_id) -> int:
        """The rank owning the id: the first virtual node clockwise of its hash."""
        return next(self.walk(rollout_id))

    def shares(self) -> dict[int, float]:
        """Fraction of the ring each rank owns (the expected fraction of ids it receives)."""
        out = dict.fromkeys(self.ranks, 0)
        prev = self._points[-1][0] - 2**64  # the arc ending at the first point wraps around zero
        for pos, r in self._points:
            out[r] += pos - prev
            prev = pos
        return {r: a / 2**64 for r, a in out.items()}


class RolloutRouter:
    """Sticky, bounded-load routing of rollouts to data-parallel ranks (module docstring for the bound).

    ``route(id)`` at every turn returns the rollout's rank (placing it on first sight);
    ``release(id)`` when the rollout ends frees its slot.
    """

    def __init__(self, ranks: int | Iterable[int], eps: float | None = 0.25, vnodes: int = 128):
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                                or not math.isfinite(eps) or eps < 0):
            raise ValueError(f"RolloutRouter eps: expected a finite number >= 0 or None (no bound), got {eps!r}")
        self.ring = HashRing(ranks, vnodes)
        self.eps = eps
        self.placement: dict[str, int] = {}  # active rollout key -> rank
        self.load: dict[int, int] = dict.fromkeys(self.ring.ranks, 0)  # active rollouts per rank

    def capacity(self, active: int) -> int | float:
        """c(m) = ceil((1 + eps) m / N): the most rollouts a rank may hold when m are active."""
        if self.eps is None:
            return math.inf
        return math.ceil((1 + self.eps) * active / len(self.load))

    def route(self, rollout_id) -> int:
        """The rank for this turn of the rollout: where it already is, or a newly chosen one."""
        key = _rollout_key(rollout_id)
        if key in self.placement:
            return self.placement[key]  # sticky: its KV/prefix cache lives there
        cap = self.capacity(len(self.placement) + 1)
        rank = next(r for r in self.ring.walk(rollout_id) if self.load[r] < cap)  # always found (docstring)
        self.placement[key] = rank
        self.load[rank] += 1
        return rank

    def release(self, rollout_id) -> None:
        """The rollout finished: free its slot."""
        key = _rollout_key(rollout_id)
        if key not in self.placement:
            raise ValueError(f"RolloutRouter.release: rollout {rollout_id!r} is not active")
        self.load[self.placement.pop(key)] -= 1

    def add_rank(self, rank: int) -> None:
        """A new engine joins: it receives new rollouts; running ones stay where their caches are."""
        self.ring.add_rank(rank)
        self.load[rank] = 0

    def remove_rank(self, rank: int) -> list[str]:
        """An engine leaves: its rollouts lose their caches and are placed again. Returns their keys."""
        self.ring.remove_rank(rank)
        del self.load[rank]
        moved = [k for k, r in self.placement.items() if r == rank]
        for k in moved:
            del self.placement[k]
        for k in moved:
            self.route(_id_from_key(k))
        return moved

    def active(self) -> int:
        return len(self.placement)


def _id_from_key(key: str) -> str:
    return key[len("rollout:"):]
