"""A small training job run as a subprocess by test_resume.py (killed and restarted)."""
import sys

import numpy as np

from tiny import TINY, tiny_base, tiny_study
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.engine import Static
from jaxpoison.train.lora import LoraConfig
from jaxpoison.train.trainer import train_study

ST = Static(TINY, TrainConfig(learning_rate=5e-3, epochs=3, batch_size=4, save_every=2, keep_last=3,
                              weight_decay=0.01, schedule="cosine", warmup_steps=2),
            LoraConfig(r=4, alpha=8, dropout=0.1, targets=("q", "v")))

if __name__ == "__main__":
    run_dir, out = sys.argv[1], sys.argv[2]
    res = train_study(tiny_base(), ST, tiny_study(V=3), run_dir=run_dir, progress=False)
    np.savez(out, **{f"{m}.{k}": np.asarray(x) for m, ab in res.lora.items() for k, x in ab.items()},
             resumed=np.int32(-1 if res.resumed_from is None else res.resumed_from))
