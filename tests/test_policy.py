"""Policies: reading them from TOML and dicts, checking them, and what they hand on."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import pickle
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given

import gpugate.policy
from gpugate import ConfigError, UsageError
from gpugate.policy import DEFAULT_POLICY_TOML, ClassPolicy, Policy, PoolSettings
from strategies import class_policies, policies

GiB = 1024**3

EXAMPLE: dict[str, Any] = {
    "pool": {"lease_ttl": "5s", "safety_margin": "0", "placement": "best-fit"},
    "classes": {
        "interactive": {"priority": 100, "max_concurrent": 4, "reserve": "8GiB"},
        "batch": {"priority": 10, "max_concurrent": 3, "rate": "10/s", "burst": 5},
    },
}


def with_class(**knobs: Any) -> dict[str, Any]:
    """A policy dict with one class, ``batch``, at priority 10 plus *knobs*."""
    return {"classes": {"batch": {"priority": 10, **knobs}}}


def with_pool(**knobs: Any) -> dict[str, Any]:
    """A policy dict with *knobs* in its pool table and one class."""
    return {"pool": knobs, **with_class()}


class TestPublicNames:
    """gpugate.policy exports exactly its documented names."""

    def test_all_is_pinned(self) -> None:
        assert gpugate.policy.__all__ == [
            "DEFAULT_POLICY_TOML",
            "ClassPolicy",
            "Policy",
            "PoolSettings",
        ]


class TestFromDict:
    """Policy.from_dict reads the TOML structure, converting units to base units."""

    def test_the_documented_example_reads_as_written(self) -> None:
        policy = Policy.from_dict(EXAMPLE)
        assert policy.pool == PoolSettings(lease_ttl_s=5.0)
        assert policy.classes["interactive"] == ClassPolicy(
            name="interactive", priority=100, max_concurrent=4, reserve=8 * GiB
        )
        assert policy.classes["batch"] == ClassPolicy(
            name="batch", priority=10, max_concurrent=3, rate=10.0, burst=5
        )

    def test_a_missing_pool_table_means_default_pool_settings(self) -> None:
        assert Policy.from_dict(with_class()).pool == PoolSettings()

    def test_every_pool_knob_is_read(self) -> None:
        policy = Policy.from_dict(
            with_pool(
                safety_margin="1GiB",
                lease_ttl="10s",
                placement="spread",
                sample_max_age="500ms",
                waiter_ttl="3s",
                priority_aging="6/min",
                retry_max="1m",
                max_per_device=4,
            )
        )
        assert policy.pool == PoolSettings(
            safety_margin=GiB,
            lease_ttl_s=10.0,
            placement="spread",
            sample_max_age_s=0.5,
            waiter_ttl_s=3.0,
            priority_aging=0.1,
            retry_max_s=60.0,
            max_per_device=4,
        )

    def test_every_class_knob_is_read(self) -> None:
        policy = Policy.from_dict(
            with_class(
                max_concurrent=3,
                max_per_device=1,
                rate="100/min",
                burst=2,
                reserve="512MiB",
                max_duration="8h",
                max_duration_contended="1h30m",
                max_fragmentation=0.25,
                no_gpu="cpu",
                on_backend_error="open",
                queues=["ocr:bulk", "ocr:retry"],
            )
        )
        assert policy.classes["batch"] == ClassPolicy(
            name="batch",
            priority=10,
            max_concurrent=3,
            max_per_device=1,
            rate=100 / 60,
            burst=2,
            reserve=512 * 1024**2,
            max_duration_s=28800.0,
            max_duration_contended_s=5400.0,
            max_fragmentation=0.25,
            no_gpu="cpu",
            on_backend_error="open",
            queues=("ocr:bulk", "ocr:retry"),
        )

    def test_sizes_durations_and_rates_may_be_plain_numbers(self) -> None:
        policy = Policy.from_dict(
            {
                "pool": {"safety_margin": 1024, "lease_ttl": 5, "priority_aging": 0.5},
                "classes": {"batch": {"priority": 1, "rate": 2, "max_duration": 60.5}},
            }
        )
        assert (policy.pool.safety_margin, policy.pool.lease_ttl_s) == (1024, 5.0)
        assert policy.pool.priority_aging == 0.5
        assert (policy.classes["batch"].rate, policy.classes["batch"].max_duration_s) == (2.0, 60.5)

    def test_none_means_not_set(self) -> None:
        policy = Policy.from_dict(
            {"pool": {"max_per_device": None}, **with_class(max_concurrent=None, rate=None)}
        )
        assert policy == Policy.from_dict(with_class())

    def test_burst_defaults_to_the_rate_per_second_rounded_up(self) -> None:
        assert Policy.from_dict(with_class(rate="2.5/s")).classes["batch"].burst == 3
        assert Policy.from_dict(with_class(rate="1/min")).classes["batch"].burst == 1

    def test_classes_are_ordered_by_priority_then_name(self) -> None:
        policy = Policy.from_dict(
            {
                "classes": {
                    "low": {"priority": 1},
                    "zeta": {"priority": 50},
                    "alpha": {"priority": 50},
                    "top": {"priority": 99},
                }
            }
        )
        assert list(policy.classes) == ["top", "alpha", "zeta", "low"]

    def test_classes_may_share_a_priority(self) -> None:
        policy = Policy.from_dict({"classes": {"a": {"priority": 5}, "b": {"priority": 5}}})
        assert {c.priority for c in policy.classes.values()} == {5}

    @pytest.mark.parametrize("name", ["cpu", "a", "gpu-heavy_2", "x" * 32])
    def test_any_lowercase_name_is_a_class_name(self, name: str) -> None:
        assert name in Policy.from_dict({"classes": {name: {"priority": 1}}}).classes


class TestValidation:
    """A bad policy fails at load with the source, the dotted key, the value and the fix."""

    @pytest.mark.parametrize(
        ("data", "key", "shown"),
        [
            (with_pool(safety_margin="lots"), "pool.safety_margin", '"lots"'),
            (with_pool(safety_margin=-1), "pool.safety_margin", "-1"),
            (with_pool(lease_ttl="0s"), "pool.lease_ttl", '"0s"'),
            (with_pool(lease_ttl="soon"), "pool.lease_ttl", '"soon"'),
            (with_pool(placement="bestfit"), "pool.placement", '"bestfit"'),
            (with_pool(sample_max_age=0), "pool.sample_max_age", '"0s"'),
            (with_pool(waiter_ttl="-5s"), "pool.waiter_ttl", '"-5s"'),
            (with_pool(priority_aging="-1/s"), "pool.priority_aging", '"-1/s"'),
            (with_pool(retry_max="0.1ms"), "pool.retry_max", '"0.1ms"'),
            (with_pool(max_per_device=-2), "pool.max_per_device", "-2"),
            (with_pool(max_per_device=1.5), "pool.max_per_device", "1.5"),
            (with_pool(max_per_device=0), "pool.max_per_device", "0"),
            (with_pool(lease_ttl="500ms"), "pool.lease_ttl", '"500ms"'),
            (with_pool(waiter_ttl="100ms"), "pool.waiter_ttl", '"100ms"'),
            (with_pool(retry_max="50ms"), "pool.retry_max", '"50ms" is too short'),
            (with_pool(safety_margin=2**63), "pool.safety_margin", str(2**63)),
            (with_class(max_concurrent=10**7), "classes.batch.max_concurrent", str(10**7)),
            (with_class(rate="1/s", burst=2**40), "classes.batch.burst", str(2**40)),
            (with_class(rate="2000000/s"), "classes.batch.rate", '"2000000/s"'),
            (with_class(max_duration=10**16), "classes.batch.max_duration", str(10**16)),
            (with_class(priority=-1), "classes.batch.priority", "-1"),
            (with_class(priority=1_000_001), "classes.batch.priority", "1000001"),
            (with_class(priority="high"), "classes.batch.priority", '"high"'),
            (with_class(priority=True), "classes.batch.priority", "True"),
            (with_class(max_concurrent=-1), "classes.batch.max_concurrent", "-1"),
            (with_class(max_concurrent="4"), "classes.batch.max_concurrent", '"4"'),
            (with_class(max_per_device=-1), "classes.batch.max_per_device", "-1"),
            (with_class(rate="fast"), "classes.batch.rate", '"fast"'),
            (with_class(rate="0/s"), "classes.batch.rate", '"0/s"'),
            (with_class(burst=5), "classes.batch.burst", "5"),
            (with_class(rate="1/s", burst=0), "classes.batch.burst", "0"),
            (with_class(reserve="8G"), "classes.batch.reserve", '"8G"'),
            (with_class(reserve=[8]), "classes.batch.reserve", "[8]"),
            (with_class(max_duration="0ms"), "classes.batch.max_duration", '"0s"'),
            (
                with_class(max_duration="1h", max_duration_contended="2h"),
                "classes.batch.max_duration_contended",
                '"2h"',
            ),
            (with_class(max_fragmentation=1.5), "classes.batch.max_fragmentation", "1.5"),
            (with_class(max_fragmentation="low"), "classes.batch.max_fragmentation", '"low"'),
            (with_class(no_gpu="fallback"), "classes.batch.no_gpu", '"fallback"'),
            (with_class(on_backend_error="shut"), "classes.batch.on_backend_error", '"shut"'),
            (with_class(max_concurent=3), "classes.batch.max_concurent", '"max_concurent"'),
            ({"classes": {"Batch": {"priority": 1}}}, "classes.Batch", '"Batch"'),
            ({"classes": {"x" * 33: {"priority": 1}}}, "classes." + "x" * 33, '"' + "x" * 33),
            ({"classes": {"batch": 5}}, "classes.batch", "5"),
            ({"classes": {"batch": {}}}, "classes.batch.priority", "priority"),
            ({"pool": "fast", **with_class()}, "pool", '"fast"'),
            ({"classes": ["batch"]}, "classes", "['batch']"),
            (with_class(queues="ocr:bulk"), "classes.batch.queues", '"ocr:bulk" is not a list'),
            (with_class(queues=["ok", " "]), "classes.batch.queues[1]", '" " is not an Asynq'),
            (with_class(queues=[3]), "classes.batch.queues[0]", "3 is not an Asynq queue name"),
            (with_class(queues=["a", "b", "a"]), "classes.batch.queues[2]", '"a" is listed twice'),
            (
                {
                    "classes": {
                        "interactive": {"priority": 100, "queues": ["ocr:fast"]},
                        "batch": {"priority": 10, "queues": ["ocr:bulk", "ocr:fast"]},
                    }
                },
                "classes.batch.queues[1]",
                'queue "ocr:fast" is already a queue of class "interactive"; a queue belongs '
                "to at most one class",
            ),
        ],
    )
    def test_each_error_names_source_key_and_value(
        self, data: dict[str, Any], key: str, shown: str
    ) -> None:
        with pytest.raises(ConfigError) as caught:
            Policy.from_dict(data, source="team.toml")
        err = caught.value
        assert (err.source, err.key) == ("team.toml", key)
        assert str(err).startswith(f"team.toml: {key}: ")
        assert shown in str(err)

    def test_a_misspelt_key_gets_the_closest_known_one(self) -> None:
        with pytest.raises(ConfigError) as caught:
            Policy.from_dict(with_class(max_concurent=3))
        assert str(caught.value).endswith(
            'unknown key "max_concurent"; did you mean "max_concurrent"?'
        )

    def test_an_unknown_key_with_no_close_match_lists_the_known_ones(self) -> None:
        with pytest.raises(ConfigError, match='known keys are "priority", "max_concurrent"'):
            Policy.from_dict(with_class(colour="blue"))

    def test_unknown_keys_are_reported_before_bad_values(self) -> None:
        with pytest.raises(ConfigError) as caught:
            Policy.from_dict(with_class(burst=5, rat="10/s"))
        assert caught.value.key == "classes.batch.rat"

    def test_unknown_top_level_tables_are_reported(self) -> None:
        with pytest.raises(ConfigError, match='did you mean "pool"') as caught:
            Policy.from_dict({"pools": {}, **with_class()})
        assert caught.value.key == "pools"

    @pytest.mark.parametrize("data", [{}, {"classes": {}}, {"pool": {}}])
    def test_a_policy_needs_a_class(self, data: dict[str, Any]) -> None:
        with pytest.raises(ConfigError, match="no classes are defined") as caught:
            Policy.from_dict(data)
        assert caught.value.key == "classes"

    def test_a_bad_queue_name_is_the_value_reported(self) -> None:
        with pytest.raises(ConfigError) as caught:
            Policy.from_toml('[classes.batch]\npriority = 1\nqueues = ["a", ""]\n', source="t")
        assert (caught.value.key, caught.value.value) == ("classes.batch.queues[1]", "")

    def test_a_bad_value_reports_what_was_written_not_the_converted_number(self) -> None:
        with pytest.raises(ConfigError) as caught:
            Policy.from_dict(with_class(max_duration="1h", max_duration_contended="2h"))
        assert caught.value.value == "2h"

    def test_the_default_source_of_a_dict_is_named(self) -> None:
        with pytest.raises(ConfigError, match=r"^<dict>: classes\.batch\.priority: "):
            Policy.from_dict(with_class(priority=-1))

    def test_direct_construction_is_checked_too(self) -> None:
        with pytest.raises(ConfigError) as caught:
            ClassPolicy(name="batch", priority=10, burst=3)
        assert caught.value.key == "classes.batch.burst"
        with pytest.raises(ConfigError, match=r"^pool\.lease_ttl: "):
            PoolSettings(lease_ttl_s=0)

    def test_direct_construction_normalises_numbers(self) -> None:
        pool = PoolSettings(lease_ttl_s=5)
        assert isinstance(pool.lease_ttl_s, float)
        assert pool == PoolSettings(lease_ttl_s=5.0)

    def test_a_class_filed_under_another_name_is_refused(self) -> None:
        with pytest.raises(ConfigError, match="use the same name"):
            Policy(PoolSettings(), {"batch": ClassPolicy(name="interactive", priority=1)})


class TestToml:
    """Policies load from TOML text and files; errors name the file, the line or the key."""

    def test_toml_text_reads_like_the_dict(self) -> None:
        text = """
            [pool]
            lease_ttl = "5s"
            safety_margin = "0"
            placement = "best-fit"

            [classes.interactive]
            priority = 100
            max_concurrent = 4
            reserve = "8GiB"

            [classes.batch]
            priority = 10
            max_concurrent = 3
            rate = "10/s"
            burst = 5
        """
        assert Policy.from_toml(text) == Policy.from_dict(EXAMPLE)

    def test_a_file_loads(self, tmp_path: Path) -> None:
        path = tmp_path / "gpugate.toml"
        path.write_text('[classes.batch]\npriority = 10\nreserve = "1GiB"\n')
        policy = Policy.from_file(path)
        assert policy.classes["batch"].reserve == GiB
        assert Policy.from_file(str(path)) == policy

    def test_a_syntax_error_names_the_file_and_line(self, tmp_path: Path) -> None:
        path = tmp_path / "broken.toml"
        path.write_text("[pool]\nlease_ttl = 5s\n")
        with pytest.raises(ConfigError) as caught:
            Policy.from_file(path)
        assert caught.value.source == str(path)
        assert str(caught.value).startswith(f"{path}: not valid TOML: ")
        assert "line 2" in str(caught.value)

    def test_a_bad_value_names_the_file_and_key(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.toml"
        path.write_text('[classes.batch]\npriority = 10\nrate = "10 per second"\n')
        with pytest.raises(ConfigError) as caught:
            Policy.from_file(path)
        err = caught.value
        assert (err.source, err.key, err.value) == (
            str(path),
            "classes.batch.rate",
            "10 per second",
        )
        assert str(err).startswith(f'{path}: classes.batch.rate: "10 per second" is not a rate')

    def test_a_missing_file_is_named(self, tmp_path: Path) -> None:
        path = tmp_path / "absent.toml"
        with pytest.raises(ConfigError, match="no policy file at") as caught:
            Policy.from_file(path)
        assert caught.value.source == str(path)

    def test_a_directory_is_not_a_policy_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="cannot read policy file"):
            Policy.from_file(tmp_path)

    def test_a_file_that_is_not_utf8_is_not_toml(self, tmp_path: Path) -> None:
        path = tmp_path / "latin1.toml"
        path.write_bytes(b"[classes.caf\xe9]\npriority = 1\n")
        with pytest.raises(ConfigError, match="not UTF-8"):
            Policy.from_file(path)

    def test_a_byte_order_mark_some_editors_write_is_ignored(self, tmp_path: Path) -> None:
        path = tmp_path / "bom.toml"
        path.write_bytes(b"\xef\xbb\xbf[classes.batch]\npriority = 1\n")
        assert list(Policy.from_file(path).classes) == ["batch"]

    def test_toml_text_names_its_source(self) -> None:
        with pytest.raises(ConfigError, match=r"^inline: classes\.batch\.priority: "):
            Policy.from_toml("[classes.batch]\npriority = -1\n", source="inline")


class TestDefault:
    """DEFAULT_POLICY_TOML is a valid, documented policy, the one Policy.default() returns."""

    def test_it_parses_to_the_default_policy(self) -> None:
        assert Policy.from_toml(DEFAULT_POLICY_TOML) == Policy.default()

    def test_it_has_interactive_notebook_and_batch(self) -> None:
        policy = Policy.default()
        assert {name: c.priority for name, c in policy.classes.items()} == {
            "interactive": 100,
            "notebook": 50,
            "batch": 10,
        }
        assert policy.classes["notebook"].max_duration_s == 8 * 3600
        assert policy.pool == PoolSettings()

    def test_every_knob_is_explained(self) -> None:
        knobs = {*PoolSettings.__dataclass_fields__, *ClassPolicy.__dataclass_fields__} - {"name"}
        toml_keys = {knob.removesuffix("_s") for knob in knobs}
        for key in toml_keys:
            assert f"\n# {key} = " in DEFAULT_POLICY_TOML or f"\n{key} = " in DEFAULT_POLICY_TOML

    def test_it_is_plain_toml(self) -> None:
        assert set(tomllib.loads(DEFAULT_POLICY_TOML)) == {"pool", "classes"}


class TestRoundTrip:
    """to_dict gives back the same policy, through JSON and pickle too."""

    @given(policies())
    def test_from_dict_of_to_dict_is_the_same_policy(self, policy: Policy) -> None:
        assert Policy.from_dict(policy.to_dict()) == policy

    @given(policies())
    def test_to_dict_survives_json(self, policy: Policy) -> None:
        again = Policy.from_dict(json.loads(json.dumps(policy.to_dict())))
        assert again == policy
        assert again.version == policy.version

    @given(policies())
    def test_a_policy_pickles_and_copies(self, policy: Policy) -> None:
        assert pickle.loads(pickle.dumps(policy)) == policy
        assert copy.deepcopy(policy) == policy

    def test_to_dict_uses_human_strings(self) -> None:
        assert Policy.from_dict(EXAMPLE).to_dict() == {
            "pool": {
                "safety_margin": "0B",
                "lease_ttl": "5s",
                "placement": "best-fit",
                "sample_max_age": "2s",
                "waiter_ttl": "5s",
                "priority_aging": "0/s",
                "retry_max": "30s",
            },
            "classes": {
                "interactive": {
                    "priority": 100,
                    "max_concurrent": 4,
                    "reserve": "8GiB",
                    "no_gpu": "defer",
                    "on_backend_error": "closed",
                },
                "batch": {
                    "priority": 10,
                    "max_concurrent": 3,
                    "rate": "10/s",
                    "burst": 5,
                    "reserve": "0B",
                    "no_gpu": "defer",
                    "on_backend_error": "closed",
                },
            },
        }

    def test_queues_are_a_list_in_to_dict_and_left_out_when_there_are_none(self) -> None:
        data = Policy.from_dict(with_class(queues=("ocr:bulk", "ünï", " q"))).to_dict()
        assert data["classes"]["batch"]["queues"] == ["ocr:bulk", "ünï", " q"]
        assert Policy.from_dict(data).classes["batch"].queues == ("ocr:bulk", "ünï", " q")
        assert "queues" not in Policy.from_dict(with_class(queues=[])).to_dict()["classes"]["batch"]

    def test_to_dict_keeps_numbers_no_short_string_says_exactly(self) -> None:
        data = Policy.from_dict(with_class(reserve=4 * GiB + 1, max_duration=1.2345)).to_dict()
        assert data["classes"]["batch"]["reserve"] == 4 * GiB + 1
        assert data["classes"]["batch"]["max_duration"] == 1.2345


class TestWire:
    """to_wire is what the Lua scripts read: integer ms and bytes, -1 for none."""

    def test_the_example_on_the_wire(self) -> None:
        assert Policy.from_dict(EXAMPLE).to_wire() == {
            "pool": {
                "margin": 0,
                "ttl_ms": 5000,
                "placement": "best-fit",
                "max_age_ms": 2000,
                "waiter_ttl_ms": 5000,
                "aging_per_ms": 0.0,
                "retry_max_ms": 30000,
                "max_per_device": -1,
            },
            "classes": {
                "interactive": {
                    "prio": 100,
                    "cap": 4,
                    "dev_cap": -1,
                    "rate_per_ms": 0.0,
                    "burst": 0,
                    "reserve": 8 * GiB,
                    "max_ms": -1,
                    "max_contended_ms": -1,
                    "no_gpu": "defer",
                    "max_frag": -1,
                },
                "batch": {
                    "prio": 10,
                    "cap": 3,
                    "dev_cap": -1,
                    "rate_per_ms": 0.01,
                    "burst": 5,
                    "reserve": 0,
                    "max_ms": -1,
                    "max_contended_ms": -1,
                    "no_gpu": "defer",
                    "max_frag": -1,
                },
            },
        }

    def test_set_knobs_reach_the_wire_in_ms_and_per_ms(self) -> None:
        wire = Policy.from_dict(
            {
                "pool": {"priority_aging": "6/min", "max_per_device": 2},
                **with_class(max_per_device=1, max_duration="8h", max_duration_contended="500ms"),
            }
        ).to_wire()
        assert wire["pool"]["aging_per_ms"] == pytest.approx(0.0001)
        assert wire["pool"]["max_per_device"] == 2
        batch = wire["classes"]["batch"]
        assert (batch["dev_cap"], batch["max_ms"], batch["max_contended_ms"]) == (
            1,
            28_800_000,
            500,
        )

    @given(policies())
    def test_only_rates_and_fractions_are_not_integers(self, policy: Policy) -> None:
        wire = policy.to_wire()
        json.dumps(wire)
        for section in (wire["pool"], *wire["classes"].values()):
            for name, value in section.items():
                if name in ("aging_per_ms", "rate_per_ms"):
                    assert isinstance(value, float)
                elif name == "queues":
                    assert value
                    assert all(isinstance(q, str) for q in value), value
                elif name == "max_frag":
                    assert value == -1 or (isinstance(value, float) and 0 <= value <= 1), value
                elif name not in ("placement", "no_gpu"):
                    assert type(value) is int, name

    def test_the_version_is_the_hash_of_the_canonical_wire_json(self) -> None:
        policy = Policy.from_dict(EXAMPLE)
        canonical = json.dumps(policy.to_wire(), sort_keys=True, separators=(",", ":"))
        assert policy.version == hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def test_the_same_policy_written_differently_has_the_same_version(self) -> None:
        spelled = Policy.from_dict(with_class(rate="600/min", reserve="1GiB", max_duration="1h"))
        numbers = Policy.from_dict(with_class(rate=10, reserve=GiB, max_duration=3600))
        assert spelled.version == numbers.version

    def test_a_policy_without_queues_keeps_the_version_it_had_before_queues_existed(
        self,
    ) -> None:
        # Pools store this version; a gate whose policy reads differently
        # reports a mismatch, so adding the knob must not move it.
        assert Policy.default().version == "ab71f1406e1a2d2e"
        assert all("queues" not in c for c in Policy.default().to_wire()["classes"].values())

    def test_queues_are_on_the_wire_so_that_changing_them_changes_the_version(self) -> None:
        one = Policy.from_dict(with_class(queues=["ocr:bulk"]))
        assert one.to_wire()["classes"]["batch"]["queues"] == ["ocr:bulk"]
        assert one.version != Policy.from_dict(with_class()).version
        assert one.version != Policy.from_dict(with_class(queues=["ocr:bulk", "x"])).version

    def test_queue_classes_maps_each_queue_to_its_class(self) -> None:
        policy = Policy.from_dict(
            {
                "classes": {
                    "batch": {"priority": 10, "queues": ["b2", "b1"]},
                    "interactive": {"priority": 100, "queues": ["i"]},
                }
            }
        )
        assert policy.queue_classes() == {"i": "interactive", "b2": "batch", "b1": "batch"}

    def test_any_change_the_scripts_see_changes_the_version(self) -> None:
        base = Policy.from_dict(EXAMPLE)
        changed = Policy.from_dict({**EXAMPLE, "pool": {**EXAMPLE["pool"], "lease_ttl": "6s"}})
        assert changed.version != base.version


class TestLookups:
    """class_policy, reserve_above and highest_class answer per-class questions."""

    def test_class_policy_returns_the_class(self) -> None:
        assert Policy.from_dict(EXAMPLE).class_policy("batch").priority == 10

    def test_an_unknown_class_is_a_usage_error_naming_the_known_ones(self) -> None:
        with pytest.raises(UsageError) as caught:
            Policy.from_dict(EXAMPLE).class_policy("bach")
        message = str(caught.value)
        assert '"bach"' in message
        assert 'did you mean "batch"' in message
        assert '"interactive", "batch"' in message

    def test_reserve_above_sums_the_reserves_of_strictly_higher_classes(self) -> None:
        policy = Policy.from_dict(
            {
                "classes": {
                    "interactive": {"priority": 100, "reserve": "8GiB"},
                    "notebook": {"priority": 50, "reserve": "4GiB"},
                    "peer": {"priority": 50, "reserve": "2GiB"},
                    "batch": {"priority": 10, "reserve": "1GiB"},
                }
            }
        )
        assert policy.reserve_above("interactive") == 0
        assert policy.reserve_above("notebook") == 8 * GiB
        assert policy.reserve_above("peer") == 8 * GiB
        assert policy.reserve_above("batch") == 14 * GiB

    def test_reserve_above_an_unknown_class_is_a_usage_error(self) -> None:
        with pytest.raises(UsageError):
            Policy.from_dict(EXAMPLE).reserve_above("nobody")

    def test_highest_class_breaks_ties_by_name(self) -> None:
        policy = Policy.from_dict({"classes": {"zed": {"priority": 7}, "amy": {"priority": 7}}})
        assert policy.highest_class == "amy"
        assert Policy.default().highest_class == "interactive"

    @given(class_policies(name="solo"))
    def test_a_single_class_is_highest_and_holds_nothing_back(self, solo: ClassPolicy) -> None:
        policy = Policy(PoolSettings(), {"solo": solo})
        assert policy.highest_class == "solo"
        assert policy.reserve_above("solo") == 0


class TestImmutability:
    """A policy cannot change after it is built, so its version stays true."""

    def test_settings_are_frozen(self) -> None:
        policy = Policy.default()
        with pytest.raises(dataclasses.FrozenInstanceError):
            policy.pool.lease_ttl_s = 1.0  # type: ignore[misc]

    def test_the_classes_mapping_is_read_only(self) -> None:
        policy = Policy.default()
        with pytest.raises(TypeError):
            policy.classes["batch"] = policy.classes["interactive"]  # type: ignore[index]

    def test_the_caller_s_dict_does_not_leak_in(self) -> None:
        classes = {"batch": ClassPolicy(name="batch", priority=1)}
        policy = Policy(PoolSettings(), classes)
        classes["other"] = ClassPolicy(name="other", priority=2)
        assert list(policy.classes) == ["batch"]

    def test_equal_policies_hash_alike(self) -> None:
        assert hash(Policy.default()) == hash(Policy.from_toml(DEFAULT_POLICY_TOML))
        assert len({Policy.default(), Policy.default()}) == 1
