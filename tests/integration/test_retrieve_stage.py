"""The retrieve stage with a real open_clip model: random weights built offline and saved as a local checkpoint (no
pretrained CLIP weights exist here), the real loading code, real corpora and a real local HTTP search API."""

from __future__ import annotations

import sys
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the local test server helper
from retrieve_server import API_KEY, HostileServer  # noqa: E402

import conftest  # noqa: E402
from gmner_pipeline.ingest.text_conll import read_text_conll  # noqa: E402
from gmner_pipeline.schema import records_to_table  # noqa: E402
from gmner_pipeline.stage import StageContext, StageSetupError  # noqa: E402
from gmner_pipeline.stages.retrieve import RetrieveConfig, RetrieveStage  # noqa: E402
from gmner_pipeline.stages.retrieve.clip_model import ClipEncoder, check_weights  # noqa: E402
from gmner_pipeline.stages.retrieve.config import ClipConfig, LocalCorpusSource  # noqa: E402
from gmner_pipeline.stages.retrieve.corpus import build_or_load_index  # noqa: E402
from gmner_pipeline.stages.retrieve.images import open_checked, to_rgb  # noqa: E402

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data" / "retrieve"
TINY = "gmner-tiny-clip"
TINY_CONFIG = DATA / f"{TINY}.json"
SHARED = conftest.SHARED
LABEL_MAP = {"person": "PER", "organization": "ORG", "building": "LOC", "location": "LOC", "product": "OTHER"}


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    """A small random-weight open_clip model, built once and cached under .cache/ (git-ignored)."""
    digest = hashlib.sha256(TINY_CONFIG.read_bytes()).hexdigest()[:8]
    ckpt = REPO / ".cache" / "retrieve" / f"{TINY}-{digest}-seed0.pt"
    if not ckpt.is_file():
        open_clip.add_model_config(TINY_CONFIG)
        torch.manual_seed(0)
        model = open_clip.create_model(TINY, pretrained=None)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(ckpt)
    return ckpt


@pytest.fixture(scope="session")
def tiny_encoder(tiny_checkpoint):
    enc = ClipEncoder(ClipConfig(**clip_section(tiny_checkpoint)))
    yield enc
    enc.close()


def clip_section(ckpt: Path, **extra) -> dict:
    return {"model": TINY, "pretrained": str(ckpt), "model_config_file": str(TINY_CONFIG), "batch_size": 4, **extra}


def write_images(folder: Path, n: int = 4) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (40 + 8 * i, 30 + 4 * i), ((60 * i) % 256, 255 - 50 * i, (90 * i) % 256))
        path = folder / f"img{i}.png"
        img.save(path)
        paths.append(path)
    return paths


def load_file(path):
    img, info = open_checked(Path(path).read_bytes(), 10**8)
    return to_rgb(img), info


# --- loading ----------------------------------------------------------------------------------------------------------

def test_local_checkpoint_loads_the_saved_weights_and_encodes(tiny_checkpoint, tmp_path):
    enc = ClipEncoder(ClipConfig(**clip_section(tiny_checkpoint, batch_size=2)))
    saved = torch.load(tiny_checkpoint, weights_only=True)
    loaded = enc.model.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert enc.model_id.startswith(f"open_clip:{TINY}:file-") and (enc.device, enc.precision) == ("cpu", "fp32")

    texts = enc.encode_texts(["a cat", "a rocket", "a cat"])
    assert texts.shape == (3, 32) and np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    assert np.allclose(texts[0], texts[2])
    sentences = ["a cat", "Lionel Messi scores again for Barcelona at Camp Nou Lionel Messi, Barcelona, Camp Nou"]
    with torch.inference_mode():  # encoding up to the last EOT only gives exactly what open_clip's full pass gives
        full = torch.nn.functional.normalize(enc.model.encode_text(enc.tokenizer(sentences)), dim=-1).numpy()
    assert np.allclose(enc.encode_texts(sentences), full, atol=1e-5)

    paths = write_images(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    items = [paths[0], paths[1], tmp_path / "imgs" / "broken.png", paths[2], paths[3]]
    out = enc.encode_images(items, load_file)
    assert [e is None for e in out.errors] == [True, True, False, True, True]
    assert np.isnan(out.embeddings[2]).all() and not np.isnan(out.embeddings[[0, 1, 3, 4]]).any()
    with torch.inference_mode():  # same numbers as a direct open_clip call
        direct = enc.model.encode_image(torch.stack([enc.preprocess(load_file(p)[0]) for p in paths]))
    direct = torch.nn.functional.normalize(direct, dim=-1).numpy()
    assert np.allclose(out.embeddings[[0, 1, 3, 4]], direct, atol=1e-5)
    enc.close()


def test_local_dir_and_a_cached_hub_tag_load_offline(tiny_checkpoint, tiny_encoder, tmp_path, monkeypatch):
    from open_clip import pretrained as oc_pretrained
    from safetensors.torch import save_file

    open_clip.add_model_config(TINY_CONFIG)
    state = torch.load(tiny_checkpoint, weights_only=True)
    folder = tmp_path / "tiny-dir"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": json.loads(TINY_CONFIG.read_text())}))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "open_clip_model.safetensors")
    enc = ClipEncoder(ClipConfig(model=f"local-dir:{folder}", pretrained=None))
    assert enc.spec.kind == "local-dir"
    reference = tiny_encoder
    assert np.allclose(enc.encode_texts(["hello"]), reference.encode_texts(["hello"]), atol=1e-6)

    # A pretrained tag whose weights sit in the Hugging Face cache loads with no network call at all.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(oc_pretrained._PRETRAINED, TINY, {"tiny_test": oc_pretrained._pcfg(hf_hub="gmner-test/tiny/")})
    hub = tmp_path / "hf"
    snapshot = hub / "models--gmner-test--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (hub / "models--gmner-test--tiny" / "refs").mkdir()
    (hub / "models--gmner-test--tiny" / "refs" / "main").write_text("a" * 40)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "open_clip_pytorch_model.safetensors")
    tagged = ClipEncoder(ClipConfig(model=TINY, pretrained="tiny_test", cache_dir=str(hub)))
    assert tagged.spec.kind == "tag" and tagged.model_id == f"open_clip:{TINY}:tiny_test"
    assert np.allclose(tagged.encode_texts(["hello"]), reference.encode_texts(["hello"]), atol=1e-6)

    with pytest.raises(StageSetupError, match="not in the local cache"):
        check_weights(ClipConfig(model=TINY, pretrained="tiny_test", cache_dir=str(tmp_path / "empty")))

    # An hf-hub: model whose repository is in the cache loads as that snapshot folder, offline.
    repo = hub / "models--gmner-test--tiny-hub"
    snap = repo / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    (snap / "open_clip_config.json").write_text((folder / "open_clip_config.json").read_text())
    (snap / "open_clip_model.safetensors").write_bytes((folder / "open_clip_model.safetensors").read_bytes())
    from_hub = ClipEncoder(ClipConfig(model="hf-hub:gmner-test/tiny-hub", cache_dir=str(hub)))
    assert from_hub.spec.kind == "hf-hub" and from_hub.model_id == "open_clip:hf-hub:gmner-test/tiny-hub"
    assert np.allclose(from_hub.encode_texts(["hello"]), reference.encode_texts(["hello"]), atol=1e-6)
    with pytest.raises(StageSetupError, match="not in the local cache"):
        check_weights(ClipConfig(model="hf-hub:gmner-test/absent", cache_dir=str(hub)))


def test_missing_weights_fail_in_preflight_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_images(tmp_path / "corpus", 1)
    source = {"kind": "local_corpus", "path": str(tmp_path / "corpus")}
    cases = [
        ({"model": "ViT-B-32", "pretrained": str(tmp_path / "nope.pt")}, "neither a pretrained tag"),
        ({"model": "ViT-B-32", "pretrained": "openai"}, "not in the local cache"),
        ({"model": "ViT-B-32", "pretrained": None}, "pretrained is not set"),
        ({"model": f"local-dir:{tmp_path}", "pretrained": None}, "open_clip_config.json"),
        ({"model": "ViT-Nope", "pretrained": "openai"}, "unknown open_clip architecture"),
    ]
    for clip, words in cases:
        cfg = RetrieveConfig.model_validate({"source": source, "clip": clip})
        with pytest.raises(StageSetupError, match=words) as err:
            RetrieveStage.preflight(cfg)
        assert "never runs with random weights" in str(err.value) or "architecture" in words
    with pytest.raises(StageSetupError, match="source is not set"):
        RetrieveStage.preflight(RetrieveConfig())


# --- local corpus -----------------------------------------------------------------------------------------------------

def test_corpus_layouts_index_the_same_images(tiny_encoder, tmp_path):
    enc = tiny_encoder
    paths = write_images(tmp_path / "folder", 4)
    blobs = [p.read_bytes() for p in paths]
    pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in blobs], "url": [f"u{i}" for i in range(4)]}),
                   tmp_path / "corpus.parquet", row_group_size=3)
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for i, blob in enumerate(blobs):
            for name, data in ((f"{i:04d}.png", blob), (f"{i:04d}.txt", b"caption")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "list.txt").write_text("# images\n" + "\n".join(f"folder/{p.name}" for p in paths) + "\n")

    store = tmp_path / "store"
    layouts = {
        "folder": {"path": str(tmp_path / "folder")},
        "parquet": {"path": str(tmp_path / "corpus.parquet"), "uri_column": "url"},
        "webdataset": {"path": str(tmp_path / "shard-0.tar")},
        "list": {"path": str(tmp_path / "list.txt")},
    }
    query = enc.encode_texts(["a colourful square"])
    expected = sorted(hashlib.sha256(b).hexdigest() for b in blobs)
    tops = {}
    for name, section in layouts.items():
        cfg = LocalCorpusSource(index_dir=str(tmp_path / f"idx-{name}"), **section)
        index = build_or_load_index(cfg, enc, store)
        assert sorted(item["sha256"] for item in index.items) == expected, name
        for item in index.items:  # every image has a plain file a later stage can open
            path = item["stored_path"] or item["path"]
            assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == item["sha256"]
        scores, idx = index.search(query, 3)
        tops[name] = [index.items[i]["sha256"] for i in idx[0]]
        assert np.all(np.diff(scores[0]) <= 1e-7)
    assert len({tuple(v) for v in tops.values()}) == 1, tops  # same images, same model -> same ranking
    parquet = build_or_load_index(LocalCorpusSource(index_dir=str(tmp_path / "idx-parquet"), **layouts["parquet"]),
                                  enc, store)
    assert [item["uri"] for item in parquet.items] == ["u0", "u1", "u2", "u3"]


def test_corpus_index_is_reused_and_updated_incrementally(tiny_encoder, tmp_path):
    enc = tiny_encoder
    folder = tmp_path / "corpus"
    write_images(folder, 3)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cfg = LocalCorpusSource(path=str(folder), index_dir=str(tmp_path / "idx"))
    first = build_or_load_index(cfg, enc, tmp_path / "store")
    assert (first.meta["embedded_now"], first.meta["skipped"]) == (3, 1)
    assert "cannot decode JPEG" in next(iter(first.meta["skipped_reasons"].values()))
    emb_file = next((tmp_path / "idx").glob("*/embeddings.npy"))
    mtime = emb_file.stat().st_mtime_ns
    again = build_or_load_index(cfg, enc, tmp_path / "store")
    assert emb_file.stat().st_mtime_ns == mtime and np.array_equal(again.embeddings, first.embeddings)
    Image.new("RGB", (50, 50), (1, 2, 3)).save(folder / "new.png")
    updated = build_or_load_index(cfg, enc, tmp_path / "store")
    assert (updated.meta["reused"], updated.meta["embedded_now"], len(updated.items)) == (3, 1, 4)


# --- the stage, end to end ---------------------------------------------------------------------------------------------

@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "images").is_dir(), reason="needs ../shared/images (the shared photos)")
def test_end_to_end_text_only_conll_with_the_shared_photos(tiny_checkpoint, tmp_path):
    records = list(read_text_conll(DATA / "sample.conll", label_map=LABEL_MAP, source="conll:sample"))
    before = {r["id"]: [dict(e) for e in r["entities"]] for r in records}
    cfg = RetrieveConfig.model_validate({
        "source": {"kind": "local_corpus", "path": str(SHARED / "images"), "index_dir": str(tmp_path / "idx")},
        "clip": clip_section(tiny_checkpoint), "alpha": -1.0,  # random weights: keep everything to check the plumbing
    })
    RetrieveStage.preflight(cfg)
    stage = RetrieveStage(cfg, StageContext(output_dir=str(tmp_path / "out")))
    stage.setup()
    out = stage(records)
    stage.close()

    assert [r["id"] for r in out] == list(before)
    assert [r["status"] for r in out] == ["ok"] * 4 + ["dropped"]
    assert out[-1]["drop_reason"] == "too_long" and "28 tokens > max_tokens=26" in out[-1]["error"]
    photos = {p.name for p in (SHARED / "images").iterdir() if p.suffix in (".png", ".jpg")}
    for rec in out[:4]:
        image, retrieval = rec["image"], rec["retrieval"]
        assert Path(image["path"]).name in photos
        assert image["sha256"] == hashlib.sha256(Path(image["path"]).read_bytes()).hexdigest()
        with Image.open(image["path"]) as img:
            assert (image["width"], image["height"]) == img.size
        assert len(retrieval["candidates"]) == 5 and retrieval["alpha"] == -1.0
        assert retrieval["chosen_score"] == max(c["score"] for c in retrieval["candidates"])
        assert retrieval["model_id"] == stage.encoder.model_id and retrieval["source"] == "local_corpus"
        assert rec["grounding_labels"] == "absent" and rec["entities"] == before[rec["id"]]
        assert rec["lineage"][-1]["stage"] == "retrieve"
    assert out[0]["retrieval"]["query"] == ("Lionel Messi scores again for Barcelona at Camp Nou "
                                            "Lionel Messi, Barcelona, Camp Nou")
    assert [e["type"] for e in out[0]["entities"]] == ["PER", "ORG", "LOC"]
    records_to_table(out)  # the output fits the record schema

    strict = RetrieveStage(cfg.model_copy(update={"alpha": 0.99}), StageContext(output_dir=str(tmp_path / "out")))
    strict.setup()
    dropped = strict(list(read_text_conll(DATA / "sample.conll", label_map=LABEL_MAP)))
    assert [r["drop_reason"] for r in dropped] == ["below_alpha"] * 4 + ["too_long"]
    assert all(r["image"] is None and r["retrieval"]["chosen_score"] < 0.99 for r in dropped[:4])
    assert strict.counts == {"below_alpha": 4, "too_long": 1}
    strict.close()


def test_web_api_source_end_to_end(tiny_checkpoint, tmp_path, monkeypatch):
    from gmner_pipeline.schema import empty_record

    monkeypatch.setenv("GMNER_IMAGE_SEARCH_KEY", API_KEY)
    with HostileServer() as server:
        server.search_results = {
            "alpha": ["/img/red.png", "/img/blue.jpg", "/html", "/img/red-copy.png"],
            "empty": [],
            "broken": ["/html", "/missing", "/fake.jpg"],
            "fake": ["/fake.jpg", "/truncated.png"],
        }
        section = {
            "source": {"kind": "web_api", "endpoint": f"{server.url}/search", "backoff_s": 0.01},
            "clip": clip_section(tiny_checkpoint), "alpha": -1.0,
            "download": {"allow_private_hosts": True, "per_host_interval_s": 0, "backoff_s": 0.01,
                         "store_dir": str(tmp_path / "store")},
        }
        cfg = RetrieveConfig.model_validate(section)
        RetrieveStage.preflight(cfg)
        stage = RetrieveStage(cfg)
        stage.setup()
        words = ["alpha", "empty", "broken", "fake"]
        records = [empty_record(id=w, source="t", text=f"{w} words here", tokens=[w, "words", "here"],
                                grounding_labels="absent") for w in words]
        records.append(empty_record(id="gone", source="t", text="x", tokens=["x"], status="dropped"))
        out = stage(records)
        stage.close()

        by_id = {r["id"]: r for r in out}
        kept = by_id["alpha"]
        assert kept["status"] == "ok" and kept["image"]["path"].startswith(str(tmp_path / "store"))
        cands = kept["retrieval"]["candidates"]
        assert [c["uri"].rsplit("/", 1)[1] for c in cands] == ["red.png", "blue.jpg", "html", "red-copy.png"]
        assert cands[2]["score"] is None and cands[0]["sha256"] == cands[3]["sha256"]
        assert cands[0]["score"] == pytest.approx(cands[3]["score"])
        assert [by_id[w]["drop_reason"] for w in words[1:]] == ["no_candidates", "download_failed", "unreadable_image"]
        assert "HTTP 404" in by_id["broken"]["error"]
        assert by_id["gone"]["lineage"] == [] and by_id["gone"]["retrieval"] is None
        assert server.hits["/img/red.png"] == 1  # one download per URL

        down = RetrieveConfig.model_validate({**section, "source": {"kind": "web_api", "endpoint": f"{server.url}/search-down",
                                                                   "retries": 1, "api_key_env": None}})
        failing = RetrieveStage(down)
        failing.setup()
        rec = failing([empty_record(id="a", source="t", text="alpha", tokens=["alpha"])])[0]
        failing.close()
        assert rec["status"] == "error" and "HTTP 500" in rec["error"] and rec["error_stage"] == "retrieve"


@pytest.mark.skipif(not (SHARED / "images").is_dir(), reason="../shared/images absent")
def test_cli_run_retrieve_on_a_text_only_conll_file(tiny_checkpoint, tmp_path, ray_local):
    """`gmner-pipeline run retrieve` through the runner: CoNLL ingest -> retrieve shards, drops counted."""
    import yaml
    from typer.testing import CliRunner

    from gmner_pipeline.cli import app

    cfg = {
        "run": {"output_dir": str(tmp_path / "out"), "shard_size": 2, "progress": False},
        "source": {"kind": "conll", "path": str(DATA / "sample.conll"), "name": "conll-sample",
                   "label_map": LABEL_MAP},
        "pipeline": ["retrieve"],
        "stages": {"retrieve": {"alpha": -1.0, "clip": clip_section(tiny_checkpoint),
                                "source": {"kind": "local_corpus", "path": str(SHARED / "images"),
                                           "index_dir": str(tmp_path / "idx")}}},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", "retrieve", "--config", str(tmp_path / "run.yaml")])
    assert result.exit_code == 0, result.output
    status = CliRunner().invoke(app, ["status", str(tmp_path / "out")])
    assert "too_long: 1" in status.output and "3/3" in status.output
