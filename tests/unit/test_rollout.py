"""The rollout state machine (bootd/power/rollout.py), every branch, time as a parameter."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from bootd.power import rollout as ro
from bootd.power.rollout import NodeSeen, PointPool, PowerPxe, Rollout, RolloutSpec, Step

NODES = ("n1", "n2", "n3", "n4", "n5")
NEW, OLD = "k8s@v2", "k8s@v1"


def spec(**kw: object) -> RolloutSpec:
    base: dict[str, object] = dict(pool="w", image="k8s", version="v2", previous="v1",
                                   nodes=NODES, canary=1, max_unavailable=2, max_failed=1,
                                   timeout=100.0, pointer_before=None)
    base.update(kw)
    return RolloutSpec(**base)  # type: ignore[arg-type]


def powered(cmds: list[ro.Command]) -> list[tuple[str, str]]:
    return [(c.node, c.reason) for c in cmds if isinstance(c, PowerPxe)]


def pointed(cmds: list[ro.Command]) -> list[str | None]:
    return [c.version for c in cmds if isinstance(c, PointPool)]


def states(r: Rollout) -> dict[str, str]:
    return {n.name: n.state for n in r.nodes}


def joined(name: str, at: float, image: str = NEW) -> NodeSeen:
    return NodeSeen(name, "joined", image, at)


def started(**kw: object) -> tuple[Rollout, list[ro.Command]]:
    return ro.start(spec(**kw), "r1", 10.0, {})


def test_start_points_the_pool_and_boots_the_canary() -> None:
    r, cmds = started()
    assert pointed(cmds) == ["v2"] and powered(cmds) == [("n1", "rollout")]
    assert r.phase == ro.RUNNING and r.wave == 0
    assert states(r)["n1"] == ro.BOOTING and states(r)["n2"] == ro.WAITING
    assert r.node("n1") == ro.NodeProgress("n1", ro.BOOTING, 0, 10.0)
    assert any("canary: n1" in m for _, m in r.log)


def test_nodes_already_on_the_version_are_never_cycled() -> None:
    current = {"n1": joined("n1", 5.0), "n2": joined("n2", 5.0, OLD)}
    r, cmds = ro.start(spec(), "r1", 10.0, current)
    assert states(r)["n1"] == ro.HEALTHY and powered(cmds) == [("n2", "rollout")]


def test_start_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="no nodes"):
        ro.start(spec(nodes=()), "r1", 0.0, {})
    with pytest.raises(ValueError, match="max_unavailable"):
        ro.start(spec(max_unavailable=0), "r1", 0.0, {})


def test_healthy_canary_then_waves_then_completed() -> None:
    r, _ = started()
    r, cmds = ro.observe(r, joined("n1", 20.0), 21.0)
    assert states(r)["n1"] == ro.HEALTHY and powered(cmds) == [("n2", "rollout"),
                                                               ("n3", "rollout")]
    assert r.wave == 1
    r, cmds = ro.observe(r, joined("n2", 30.0), 31.0)
    assert powered(cmds) == []  # n3 of the same wave still boots
    r, cmds = ro.observe(r, joined("n3", 32.0), 33.0)
    assert powered(cmds) == [("n4", "rollout"), ("n5", "rollout")] and r.wave == 2
    r, _ = ro.observe(r, joined("n4", 40.0), 41.0)
    r, cmds = ro.observe(r, joined("n5", 42.0), 43.0)
    assert r.phase == ro.COMPLETED and r.finished == 43.0 and not r.active
    assert pointed(cmds) == []  # the pool stays on the new version
    assert any(isinstance(c, Step) and c.kind == "completed" for c in cmds)


def test_reports_from_before_the_power_cycle_do_not_count() -> None:
    r, _ = started()
    r, cmds = ro.observe(r, joined("n1", 9.0), 11.0)  # the old boot's `joined`
    assert states(r)["n1"] == ro.BOOTING and cmds == []
    r, _ = ro.observe(r, NodeSeen("n1", "rootfs", NEW, 15.0), 16.0)  # still on its way
    assert states(r)["n1"] == ro.BOOTING
    r, _ = ro.observe(r, NodeSeen("n9", "joined", NEW, 15.0), 16.0)  # not in the rollout
    assert states(r)["n1"] == ro.BOOTING


@pytest.mark.parametrize("how", ["failed", "wrong-image", "timeout", "power"])
def test_a_failed_canary_halts_and_is_reverted(how: str) -> None:
    r, _ = started(pointer_before="v0")
    if how == "failed":
        r, cmds = ro.observe(r, NodeSeen("n1", "failed", NEW, 20.0, "no rootfs"), 21.0)
        why = "reported failed: no rootfs"
    elif how == "wrong-image":
        r, cmds = ro.observe(r, joined("n1", 20.0, OLD), 21.0)
        why = f"joined on {OLD}, not {NEW}"
    elif how == "timeout":
        r, cmds = ro.tick(r, 110.0)
        assert cmds == [] and states(r)["n1"] == ro.BOOTING  # exactly the timeout: not yet
        r, cmds = ro.tick(r, 111.0)
        why = "not joined on k8s@v2 within 100s"
    else:
        r, cmds = ro.power_done(r, "n1", False, "BMC refused", 12.0)
        why = "power: BMC refused"
    assert r.phase == ro.HALTED and r.reason == f"canary n1 failed: {why}"
    assert pointed(cmds) == ["v0"]  # the pool's own pointer from before
    assert powered(cmds) == [("n1", "revert")]
    assert states(r) == {"n1": ro.REVERTING, "n2": ro.WAITING, "n3": ro.WAITING,
                         "n4": ro.WAITING, "n5": ro.WAITING}
    assert r.active  # still watching n1 come back
    assert any("halted" in m for _, m in r.log)


def revert(how: str) -> tuple[Rollout, list[ro.Command]]:
    r, _ = started()
    r, _ = ro.observe(r, NodeSeen("n1", "failed", NEW, 20.0), 21.0)
    at = 21.0  # the revert's power cycle was asked for then
    if how == "back":
        return ro.observe(r, joined("n1", at + 30, OLD), at + 31)
    if how == "failed":
        return ro.observe(r, NodeSeen("n1", "failed", OLD, at + 30), at + 31)
    if how == "wrong":
        return ro.observe(r, joined("n1", at + 30, NEW), at + 31)
    if how == "timeout":
        return ro.tick(r, at + 101)
    return ro.power_done(r, "n1", False, "no answer", at + 1)


@pytest.mark.parametrize(("how", "state"), [("back", ro.REVERTED),
                                            ("failed", ro.REVERT_FAILED),
                                            ("wrong", ro.REVERT_FAILED),
                                            ("timeout", ro.REVERT_FAILED),
                                            ("power", ro.REVERT_FAILED)])
def test_reverting_nodes_end_reverted_or_revert_failed(how: str, state: str) -> None:
    r, cmds = revert(how)
    assert states(r)["n1"] == state and r.phase == ro.HALTED and not r.active
    assert powered(cmds) == [] and pointed(cmds) == []


def test_failures_within_max_failed_continue_then_halt_past_it() -> None:
    r, _ = started(max_failed=1)
    r, _ = ro.observe(r, joined("n1", 20.0), 21.0)  # canary fine: wave 1 is n2, n3
    r, cmds = ro.observe(r, NodeSeen("n2", "failed", NEW, 30.0), 31.0)
    assert r.phase == ro.RUNNING and powered(cmds) == []  # 1 failed: not more than 1
    r, cmds = ro.observe(r, joined("n3", 32.0), 33.0)
    assert powered(cmds) == [("n4", "rollout"), ("n5", "rollout")]
    r, cmds = ro.observe(r, NodeSeen("n4", "failed", NEW, 40.0), 41.0)
    assert r.phase == ro.HALTED and r.reason is not None and "2 nodes failed" in r.reason
    # the failed ones and the one still booting go back; the healthy ones stay
    assert sorted(powered(cmds)) == [("n2", "revert"), ("n4", "revert"), ("n5", "revert")]
    assert states(r)["n1"] == ro.HEALTHY and states(r)["n3"] == ro.HEALTHY


def test_completed_with_failures_within_the_limit() -> None:
    r, _ = ro.start(spec(nodes=("n1", "n2"), max_failed=1), "r1", 0.0, {})
    r, _ = ro.observe(r, joined("n1", 5.0), 6.0)
    r, cmds = ro.observe(r, NodeSeen("n2", "failed", NEW, 7.0), 8.0)
    assert r.phase == ro.COMPLETED and states(r)["n2"] == ro.FAILED
    assert "1 failed" in [c for c in cmds if isinstance(c, Step)][-1].message


def test_no_canary_starts_with_a_full_wave() -> None:
    r, cmds = started(canary=0)
    assert r.wave == 1 and powered(cmds) == [("n1", "rollout"), ("n2", "rollout")]
    r, _ = ro.observe(r, NodeSeen("n1", "failed", NEW, 20.0), 21.0)
    assert r.phase == ro.RUNNING  # not a canary, and within max_failed


def test_pause_holds_the_next_wave_but_not_a_halt() -> None:
    r, _ = started()
    r, cmds = ro.pause(r, 12.0)
    assert r.phase == ro.PAUSED and any(isinstance(c, Step) for c in cmds)
    assert ro.pause(r, 13.0)[1] == []  # twice: nothing more
    r, cmds = ro.observe(r, joined("n1", 20.0), 21.0)  # still watched while paused
    assert states(r)["n1"] == ro.HEALTHY and powered(cmds) == []
    r, cmds = ro.resume(r, 30.0)
    assert r.phase == ro.RUNNING and powered(cmds) == [("n2", "rollout"), ("n3", "rollout")]
    assert ro.resume(r, 31.0)[1] == []
    r, _ = ro.pause(r, 32.0)
    r, _ = ro.observe(r, NodeSeen("n2", "failed", NEW, 40.0), 41.0)
    r, cmds = ro.observe(r, NodeSeen("n3", "failed", NEW, 42.0), 43.0)
    assert r.phase == ro.HALTED  # 2 > max_failed 1: a halt does not wait for resume


def test_abort_points_back_and_powers_nothing() -> None:
    r, _ = started(pointer_before="v1")
    r, cmds = ro.abort(r, 15.0)
    assert r.phase == ro.ABORTED and pointed(cmds) == ["v1"] and powered(cmds) == []
    assert not r.active and r.finished == 15.0
    for again in (ro.abort(r, 16.0), ro.pause(r, 16.0), ro.resume(r, 16.0),
                  ro.observe(r, joined("n1", 20.0), 21.0), ro.tick(r, 999.0)):
        assert again == (r, [])


def test_interrupted_steps_aside_without_touching_the_pointer() -> None:
    r, _ = started()
    r, cmds = ro.interrupted(r, 15.0, "k8s was promoted meanwhile")
    assert r.phase == ro.ABORTED and pointed(cmds) == [] and r.reason is not None
    assert ro.interrupted(r, 16.0, "again") == (r, [])


def test_json_round_trip_and_restart_keeps_deadlines() -> None:
    r, _ = started()
    r, _ = ro.observe(r, joined("n1", 20.0), 21.0)
    saved = json.loads(json.dumps(r.to_json()))
    back = Rollout.from_json(saved)
    assert back == r
    back, _ = ro.tick(back, 21.0 + 101.0)  # wave 1 began at 21: its nodes time out
    assert back.phase == ro.HALTED and states(back)["n2"] == ro.REVERTING


def test_a_restart_cycles_again_only_the_unconfirmed() -> None:
    r, _ = started(canary=0, max_unavailable=3)  # n1, n2, n3 asked for at 10
    r, _ = ro.power_done(r, "n1", True, None, 11.0)
    assert r.node("n1").powered and not r.node("n2").powered  # type: ignore[union-attr]
    r, cmds = ro.restarted(Rollout.from_json(json.loads(json.dumps(r.to_json()))), 50.0)
    assert powered(cmds) == [("n2", "rollout"), ("n3", "rollout")]
    assert r.node("n1").since == 10.0 and r.node("n2").since == 50.0  # type: ignore[union-attr]
    assert "cycling again n2, n3" in r.log[-1][1]
    done, _ = ro.abort(r, 60.0)
    assert ro.restarted(done, 70.0) == (done, [])


def test_log_is_bounded() -> None:
    r, _ = started(nodes=tuple(f"n{i}" for i in range(300)), max_unavailable=1,
                   max_failed=1000, canary=0)
    for i in range(300):
        r, _ = ro.observe(r, NodeSeen(f"n{i}", "failed", NEW, 20.0 + i), 20.5 + i)
    assert r.phase == ro.COMPLETED and len(r.log) == ro.LOG_LIMIT


# ---------------------------------------------------------------------------- the shell


def test_parse_count() -> None:
    from bootd.power.rollouts import RolloutError, parse_count

    assert parse_count("2", 10) == 2 and parse_count(3, 10) == 3
    assert parse_count("10%", 5) == 1 and parse_count("25%", 10) == 3
    with pytest.raises(RolloutError, match="percentage"):
        parse_count("many", 10)


def test_the_shell_refuses_what_it_cannot_roll_out(tmp_path: Path) -> None:
    from bootd.fleet.config import IpmiConfig, PowerConfig, SecretConfig
    from bootd.fleet.imagestore import ImageStore
    from bootd.fleet.inventory import NodeProfile
    from bootd.power.rollouts import LocalBook, RolloutError, Rollouts

    build = tmp_path / "build"
    build.mkdir()
    for name in ("vmlinuz", "initrd.img"):
        (build / name).write_bytes(name.encode())
    store = ImageStore(tmp_path / "images")
    version = store.add("k8s", build).version
    power = PowerConfig(ipmi=IpmiConfig(host="10.0.9.1", username="a",
                                        password=SecretConfig(value="p")))
    nodes = {"w": [NodeProfile("n1", ("02:00:00:00:00:01",), None, "w", image="k8s",
                               power=power)],
             "pinned": [NodeProfile("p1", (), None, "pinned", image=f"k8s@{version}",
                                    power=power)],
             "other": [NodeProfile("o1", (), None, "other", image="legacy", power=power)],
             "nopower": [NodeProfile("x1", (), None, "nopower", image="k8s")]}

    def shell() -> Rollouts:
        return Rollouts(LocalBook(tmp_path / "rollouts.json", store, lambda: 1000.0),
                        pool_nodes=lambda pool: nodes.get(pool, []), seen=lambda name: None,
                        record=lambda *a: None)

    for pool, image, why in [("w", "k8s", "name the version"),
                             ("w", "k8s@ffff", "no version ffff"),
                             ("empty", f"k8s@{version}", "no configured nodes"),
                             ("pinned", f"k8s@{version}", "pin a version"),
                             ("other", f"k8s@{version}", "boots legacy"),
                             ("nopower", f"k8s@{version}", "no `power:` for x1")]:
        with pytest.raises(RolloutError, match=re.escape(why)):
            asyncio.run(shell().start(pool, image))
    with pytest.raises(RolloutError, match="no rollout"):
        asyncio.run(shell().pause())
    # a damaged state file: nothing resumed, the shell still works
    (tmp_path / "rollouts.json").write_text("{not json")
    assert shell().current is None
