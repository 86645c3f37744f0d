"""Caption BPE (HF `tokenizers`), stored as `tokenizer.json` next to the shards."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"
MAX_TEXT_TOKENS = 70  # ONE-PEACE: at most 70 BPE tokens, then EOS; the model adds CLS
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[EOS]", "[MASK]")  # ids 0..4 in this order


class CaptionTokenizer:
    """Lowercasing BPE; `encode` returns at most MAX_TEXT_TOKENS BPE ids followed by EOS (no BOS,
    no CLS: the model adds CLS), as ONE-PEACE's hub and datasets prepare captions."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise ValueError(f"tokenizer lacks one of the special tokens {SPECIAL_TOKENS}")
        self.pad_id, self.unk_id, self.cls_id, self.eos_id, self.mask_id = ids

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids[:MAX_TEXT_TOKENS] + [self.eos_id]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids)).strip()

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> CaptionTokenizer:
    """Train on the captions: 256 byte symbols + specials + merges, fewer when the corpus runs out of merges."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # byte-level: any text encodes (no [UNK] for unseen characters) and decodes back exactly
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return CaptionTokenizer(tok)


def load_tokenizer(dataset_dir: str | Path) -> CaptionTokenizer:
    path = Path(dataset_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}: generate the dataset with `omni data synth`")
    return CaptionTokenizer(Tokenizer.from_file(str(path)))
