"""The soak benchmark: its fault-window arithmetic, then a 90-second soak against the stack it starts itself (what
`make run` runs, with a cache bound small enough to be reached). Asserts errors, jobs, memory bounds and, from the
broker Redis's INFO commandstats, that no SCAN or KEYS ran; never timings."""
from __future__ import annotations

import json
import shutil

import pytest

from benchmarks import soak
from core.settings import Settings
from tests.paths import MODELS_SOURCE

needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None,
                               reason="wrk is not installed (apt-get install wrk): the soak benchmark's load generator")


def test_fault_windows_place_failures_by_the_second():
    """One fault from 20 s to 25 s into the run: non-2xx up to the grace after it are the fault's; later ones are
    not, and neither are socket errors of a minute that no window touches."""
    result = {"timeline": {"start": -0.5, "ok": [10] * 130, "non_2xx": [0] * 130},
              "faults": [{"fault": "worker kill -9", "start": 20.0, "end": 25.0}],
              "per_minute": [{"start_s": 0.0, "seconds": 60.0, "socket_errors": {"read": 1}},
                             {"start_s": 60.0, "seconds": 60.0, "socket_errors": {"read": 0}}]}
    result["timeline"]["non_2xx"][21:30] = [3] * 9  # the seconds from 20.5 to 29.5
    [fault] = soak.fault_findings(result)
    assert fault["non_2xx"] == 27 and fault["last_non_2xx_after_end_s"] == pytest.approx(4.5) and fault["met"]
    assert soak.outside_faults(result) == (0, 0)
    result["timeline"]["non_2xx"][41] = 1  # from 40.5 s: 16.5 s after the window by its end
    result["per_minute"][1]["socket_errors"]["read"] = 2
    [fault] = soak.fault_findings(result)
    assert fault["last_non_2xx_after_end_s"] == pytest.approx(16.5) and not fault["met"]
    assert soak.outside_faults(result) == (1, 2)
    result["timeline"]["ok"][36:46] = [0] * 10  # nothing answered in the 10 s after the grace: not recovered
    result["timeline"]["non_2xx"][41] = 0
    assert not soak.fault_findings(result)[0]["met"]


@needs_wrk
def test_soak_for_90_seconds(tmp_path):
    results, md = tmp_path / "results", tmp_path / "docs" / "RESULTS.md"
    bound = "8mb"  # below what 90 s of misses put in the cache, so that eviction has to keep it there
    assert soak.main(["--minutes", "1.5", "--distinct", "500", "--cache-max-memory", bound,
                      "--models-dir", str(MODELS_SOURCE), "--results-dir", str(results), "--results-md", str(md)]) == 0
    model = Settings.from_env().default_model
    result = json.loads((results / f"soak_{model}.json").read_text())
    assert result["model"] == model and result["version"] == result["service"]["latest"]
    rows = result["per_minute"]
    assert [row["seconds"] for row in rows] == pytest.approx([60, 30], abs=1)
    assert sum(row["answered"] for row in rows) > 0
    assert [(row["non_2xx"], sum(row["socket_errors"].values())) for row in rows] == [(0, 0)] * len(rows)
    assert [job["state"] for job in result["jobs"]] == ["succeeded"] * 2, result["jobs"]
    samples = [result["before"]] + rows + [result["after"]]
    assert all(s["cache"]["maxmemory"] == 8 << 20 for s in samples)
    assert max(s["cache"]["used_memory"] for s in samples) <= (8 << 20) * (1 + soak.CACHE_SLACK)
    assert result["after"]["cache"]["evicted_keys"] > 0  # the bound was reached, and held
    assert result["after"]["gateway_rss_mb"] - result["before"]["gateway_rss_mb"] < soak.RSS_GROWTH_MB
    assert result["keyspace_calls"]["total"] == {"scan": 0, "keys": 0}  # over the broker's whole life
    stem, section = soak.names(model, faults=False)
    assert (md.parent / f"{stem}.png").is_file() and f"<!-- results:{section} -->" in md.read_text()
    assert soak.markdown(result) in md.read_text()
