"""Ingestion's verdict on every bad-input case, compared with a frozen reference.

`tests/data/ingest_reference.json` was written by the per-file ingestion (each submission read
into pandas and validated on its own) before ingestion was vectorized. For each case below (the
generator's `--with-bad-inputs` round in csv and in parquet, and hand-written files for every
branch of the contract's rules) it holds every rejection (model, kind, rule, reason), every
accepted submission's counts, and a digest of the aligned prediction matrix. Today's ingestion
must give the same, byte for byte.

The accepted portfolio weights are compared with each file read on its own with pandas, not
with a frozen digest: the generator's signal-weighted portfolios carry the last bits of a BLAS
product, which differ between CPUs (predictions are ranks, rounded, and do not).
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tc_assets.io.ingest import RoundInputs, ingest_round
from tc_assets.io.source import LocalRoundSource
from tc_assets.io.synthetic import SyntheticSettings, generate_source

REFERENCE = Path(__file__).parent / "data" / "ingest_reference.json"
SETTINGS = SyntheticSettings(stocks=600, features=16, models=40, seed=7, with_bad_inputs=True)


def _csv(path: Path, text: str) -> None:
    path.write_text(text)


def _parquet(path: Path, columns: dict) -> None:
    pq.write_table(pa.table(columns), path)


def _handwritten(rnd: Path) -> None:
    """One file per branch of the submission rules, beside the generated ones."""
    ids = pq.read_table(rnd / "live.parquet", columns=["id"]).column("id").to_pylist()
    n = len(ids)
    rng = np.random.default_rng(3)
    pred = rng.uniform(0.0, 1.0, n).round(6)
    p, w = rnd / "predictions", rnd / "portfolios"

    def rows(values, keys=None) -> str:
        keys = ids if keys is None else keys
        return "id,prediction\n" + "".join(f"{k},{v}\n" for k, v in zip(keys, values, strict=True))

    _csv(p / "hw_empty.csv", "id,prediction\n")
    _parquet(p / "hw_empty_pq.parquet", {"id": pa.array([], pa.string()), "prediction": []})
    (p / "hw_garbage.parquet").write_bytes(b"this is not a parquet file")
    _csv(p / "hw_ragged.csv", "id,prediction\na,0.1,3\n")
    _csv(p / "hw_missing_id.csv", rows(pred).replace(f"\n{ids[3]},", "\n,", 1))
    _csv(p / "hw_text_value.csv", rows([*pred[:-1], "abc"]))
    _csv(p / "hw_nan_text.csv", rows([*pred[:-1], "nan"]))
    _csv(p / "hw_ints.csv", rows(np.arange(n) % 2))
    _csv(p / "hw_upper_ID.csv", rows(pred).replace("id,prediction", "ID,prediction"))
    _parquet(p / "hw_float32.parquet", {"id": ids, "prediction": pred.astype(np.float32)})
    _parquet(p / "hw_int_ids.parquet", {"id": np.arange(n), "prediction": pred})
    _parquet(
        p / "hw_large_string.parquet", {"id": pa.array(ids, pa.large_string()), "prediction": pred}
    )
    _parquet(
        p / "hw_dictionary.parquet",
        {"id": pa.array(ids, pa.string()).dictionary_encode(), "prediction": pred},
    )
    _parquet(
        p / "hw_null_value.parquet",
        {"id": ids, "prediction": pa.array([None, *pred[1:]], pa.float64())},
    )
    _parquet(p / "hw_extra_column.parquet", {"id": ids, "prediction": pred, "other": pred})
    _parquet(p / "hw_shuffled.parquet", {"id": list(reversed(ids)), "prediction": pred})
    foreign = [f"zz{i:05d}" for i in range(40)]
    _csv(p / "hw_all_foreign.csv", rows(pred[:40], foreign))
    _csv(p / "hw_dup_foreign.csv", rows([*pred, 0.5, 0.6], [*ids, "zz1", "zz1"]))
    _csv(p / "hw_const_in_round.csv", rows([*[0.5] * n, 0.1], [*ids, "zz2"]))
    _csv(p / "hw_bounds.csv", rows([0.0, 1.0, *pred[2:]]))
    _csv(p / "hw_below_zero.csv", rows([-0.0001, *pred[1:]]))
    _csv(p / "hw_above_one.csv", rows([*pred[:-1], 1.0000001]))
    k80 = int(np.ceil(0.8 * n))
    _csv(p / "hw_cov_80.csv", rows(pred[:k80], ids[:k80]))
    _csv(p / "hw_cov_below_80.csv", rows(pred[: k80 - 1], ids[: k80 - 1]))
    _csv(p / "hw_both.csv", rows(pred))
    _parquet(p / "hw_both.parquet", {"id": ids, "prediction": pred})
    _csv(p / "bad.name!.csv", rows(pred))
    _csv(p / f"{'x' * 70}.csv", rows(pred))
    _csv(p / "NA.csv", rows(pred))
    _csv(p / "notes.txt", "not a submission")
    _csv(p / "hw_upper_suffix.CSV", rows(pred))
    _csv(p / "hw_dup_columns.csv", rows(pred).replace("id,prediction", "id,id"))
    _parquet(p / "hw_bools.parquet", {"id": ids, "prediction": np.arange(n) % 2 == 0})

    def weights(values, keys=None) -> str:
        keys = ids if keys is None else keys
        return "id,weight\n" + "".join(
            f"{k},{float(v)!r}\n" for k, v in zip(keys, values, strict=True)
        )

    base = np.zeros(n)
    base[:10], base[10:20] = 0.1, -0.1
    _csv(w / "hw_valid.csv", weights(base))
    near = base.copy()
    near[0] += 5e-7
    _csv(w / "hw_sum_within.csv", weights(near))
    off = base.copy()
    off[0] += 2e-6
    _csv(w / "hw_sum_off.csv", weights(off))
    _csv(w / "hw_foreign_weight.csv", weights([*base, 0.3], [*ids, "zz3"]))
    _csv(w / "hw_empty.csv", "id,weight\n")
    _csv(w / "hw_text.csv", weights(base) + "zz4,abc\n")


def _source(tmp_path: Path, file_format: str) -> Path:
    root = tmp_path / file_format
    generate_source(root, [1], SETTINGS.model_copy(update={"file_format": file_format}))
    if file_format == "csv":
        _handwritten(root / "rounds" / "1")
    return root


def _digest(frame: pd.DataFrame) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([list(map(str, frame.index)), list(map(str, frame.columns))]).encode())
    h.update(np.ascontiguousarray(frame.to_numpy(dtype=np.float64)).tobytes())
    return h.hexdigest()


def verdict(inputs: RoundInputs) -> dict:
    """What ingestion decided, in a form that compares byte for byte."""
    return {
        "rejections": inputs.rejections.astype(str).to_numpy().tolist(),
        "submissions": [
            [m, k, int(r), int(f), int(u), repr(float(cov))]
            for m, k, r, f, u, cov in inputs.submissions.itertuples(index=False)
        ],
        "predictions": _digest(inputs.predictions),
    }


def read_alone(folder: Path, model_id: str, ids: pd.Index) -> pd.Series:
    """One accepted portfolio file read with pandas on its own: its weights on the round's
    ids (foreign ids dropped, ids it does not hold at 0)."""
    (path,) = [p for p in folder.iterdir() if p.stem == model_id]
    if path.suffix.lower() == ".csv":
        frame = pd.read_csv(path, dtype={"id": str}, float_precision="round_trip")
    else:
        frame = pd.read_parquet(path)
    weights = frame.set_index("id")["weight"].astype(np.float64)
    return weights[weights.index.isin(ids)].reindex(ids, fill_value=0.0)


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_rejection_reasons_and_accepted_values_match_the_reference(tmp_path, file_format):
    expected = json.loads(REFERENCE.read_text())[file_format]
    root = _source(tmp_path, file_format)
    inputs = ingest_round(LocalRoundSource(root), 1)
    got = verdict(inputs)
    assert got["rejections"] == expected["rejections"]
    assert got["submissions"] == expected["submissions"]
    assert got["predictions"] == expected["predictions"]
    portfolios = inputs.portfolios
    accepted = [m for m, kind, *_ in expected["submissions"] if kind == "portfolio"]
    assert sorted(portfolios.columns) == sorted(accepted)
    folder = root / "rounds" / "1" / "portfolios"
    for model_id in portfolios.columns:
        alone = read_alone(folder, model_id, portfolios.index)
        assert portfolios[model_id].to_numpy().tobytes() == alone.to_numpy().tobytes(), model_id


if __name__ == "__main__":  # how the reference was written (by the ingestion it freezes)
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = {
            fmt: verdict(ingest_round(LocalRoundSource(_source(Path(tmp), fmt)), 1))
            for fmt in ("csv", "parquet")
        }
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1) + "\n")
