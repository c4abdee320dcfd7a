"""data.dataset=text and model.name=gpt: the corpus's sequences, the partitions by span, the causal
model, token-level evaluation, vectorized workers, and the one-line refusals."""
import pytest
import torch
import torch.nn.functional as F

from byzddp import config, data, distributed
from byzddp.errors import ConfigError
from byzddp.gpt import GPT

CORPUS = "".join(f"line {i}: the quick brown fox jumps over the lazy dog, éàü {i * i}\n" for i in range(60))
SMALL = ["data.dataset=text", "model.name=gpt", "model.width=16", "model.depth=1", "model.heads=2",
         "data.block_size=16", "workers.n=4", "workers.byzantine=1", "resampling.name=none",
         "train.batch_size=4", "train.steps=2", "log.progress=false"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


def decode(ids, vocab):
    return "".join(vocab[i] for i in ids.tolist())


def test_sequences_are_the_corpus_and_its_next_characters(corpus):
    ds = data.load_text(str(corpus), 16)
    vocab = sorted(set(CORPUS))
    assert ds.num_classes == len(vocab)
    cut = int(len(CORPUS) * 0.9)
    train, test = CORPUS[:cut], CORPUS[cut:]
    assert ds.train_x.shape == ((len(train) - 1) // 16, 16) and ds.train_x.dtype == torch.int64
    assert decode(ds.train_x.reshape(-1), vocab) == train[:ds.train_x.numel()]
    assert decode(ds.train_y.reshape(-1), vocab) == train[1:ds.train_y.numel() + 1]
    assert decode(ds.test_x.reshape(-1), vocab) == test[:ds.test_x.numel()]
    assert decode(ds.test_y.reshape(-1), vocab) == test[1:ds.test_y.numel() + 1]


def test_a_folder_is_its_text_files_in_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text(CORPUS[:2000], encoding="utf-8")
    (tmp_path / "b" / "c.md").write_text(CORPUS[2000:], encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\xff\xfe")       # not text: not read
    whole = tmp_path.parent / f"{tmp_path.name}-whole.txt"
    whole.write_text(CORPUS, encoding="utf-8")
    a, b = data.load_text(str(tmp_path), 16), data.load_text(str(whole), 16)
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, key), getattr(b, key))


def test_bad_corpora_are_one_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xff\xfe")
    for root, block, key in ((bad, 16, "data.root"), (tmp_path / "missing", 16, "data.root"),
                             (tmp_path, 16, "data.root")):
        with pytest.raises(ConfigError) as e:
            data.load_text(str(root), block)
        assert str(e.value).startswith(f"config key {key}") and "\n" not in str(e.value)
    short = tmp_path / "short.txt"
    short.write_text("x" * 100)
    with pytest.raises(ConfigError, match="config key data.block_size"):
        data.load_text(str(short), 16)


def test_contiguous_and_sorted_give_each_worker_its_own_span(corpus):
    ds = data.load_text(str(corpus), 16)
    n = len(ds.train_y)
    for kind in ("contiguous", "sorted"):
        shards = data.partition(ds.train_y, 3, kind, seed=0)
        assert torch.equal(torch.cat(shards), torch.arange(n))
        assert all((s[1:] - s[:-1] == 1).all() for s in shards)
    with pytest.raises(ConfigError, match="data.partition"):
        data.partition(ds.train_y, 3, "dirichlet", seed=0)


def test_gpt_is_causal_and_returns_classes_second():
    torch.manual_seed(0)
    model = GPT(vocab=11, block_size=12, width=16, depth=2, heads=4)
    x = torch.randint(0, 11, (3, 12))
    out = model(x)
    assert out.shape == (3, 11, 12)
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 11        # a later token cannot change an earlier prediction
    out2 = model(y)
    assert torch.equal(out[:, :, :7], out2[:, :, :7]) and not torch.allclose(out[:, :, 7:], out2[:, :, 7:])
    loss = F.cross_entropy(out, x)       # the harness's loss on (B, V, T) and (B, T)
    assert loss.shape == () and torch.isfinite(loss)


def _trainer(corpus, *extra):
    from byzddp.trainer import Trainer
    cfg = config.load(None, [*SMALL, f"data.root={corpus}", *extra])
    return Trainer(cfg, distributed.setup(cfg))


@pytest.mark.slow
def test_evaluation_counts_tokens(corpus):
    t = _trainer(corpus, "train.eval_batch_size=5")
    out = t.evaluate()
    with torch.no_grad():
        logits = t.model(t.ds.test_x)
    assert out["test_accuracy"] == pytest.approx((logits.argmax(1) == t.ds.test_y).double().mean().item(), abs=1e-9)
    assert out["test_loss"] == pytest.approx(F.cross_entropy(logits, t.ds.test_y).item(), rel=1e-5)


def test_vectorized_workers_match_the_loop(corpus):
    vec = _trainer(corpus, "workers.chunk=4", "attack.name=labelflip")
    loop = _trainer(corpus, "workers.vectorize=false", "attack.name=labelflip")
    assert vec.client.vectorized is not None and loop.client.vectorized is None
    for t in (vec, loop):
        t.client.compute_rows(0, [3])
    assert torch.allclose(vec.client.rows, loop.client.rows, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(vec.client.rows[3], torch.zeros_like(vec.client.rows[3]))


@pytest.mark.parametrize("overrides, key", [
    (["model.name=gpt"], "model.name"),
    (["data.dataset=text", "model.name=mlp"], "model.name"),
    (["data.dataset=text", "model.name=gpt", "data.partition=dirichlet"], "data.partition"),
    (["data.dataset=text", "model.name=gpt", "attack.name=backdoor"], "attack.name"),
    (["model.width=30", "model.heads=4"], "model.width"),
])
def test_refusals(overrides, key):
    with pytest.raises(ConfigError) as e:
        config.load(None, overrides)
    assert str(e.value).startswith(f"config key {key}") and "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_text_run_is_the_same_model_on_one_and_two_ranks(corpus, tmp_path):
    from helpers import summary, train
    common = [*SMALL, f"data.root={corpus}", "train.steps=3", "train.eval_every=3", "attack.name=alie",
              "resampling.name=bucketing", "workers.n=5", "data.partition=contiguous"]
    train([*common, f"log.dir={tmp_path / 'one'}", "log.name=r"])
    train([*common, f"log.dir={tmp_path / 'two'}", "log.name=r"], nproc=2)
    one, two = summary(tmp_path / "one" / "r"), summary(tmp_path / "two" / "r")
    assert one["model_sha256"] == two["model_sha256"]
    assert 0 <= one["final_test_accuracy"] <= 1
