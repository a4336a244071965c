"""Training batches of noisy patches whose rows are pure functions of (seed, step, position).

Row `p` of the global batch of step `s` is built from its own `torch.Generator`, seeded
from (seed, s, p) alone. That one generator picks the image, the crop, the flip and the
90-degree rotation, and then draws the noise (input first, target second). So any split
of the positions `range(batch_size)` across workers (`shard_positions`) yields exactly the
rows of the single-process batch, and a run resumed at step s sees the same data.

Pairs:
- target="noisy" (Noise2Noise): input and target are two independent noise draws of the
  same clean crop; target="clean": the target is the clean crop itself.
- target="neighbor" (Neighbor2Neighbor, n2n_core.neighbor): the input is one noisy crop
  (one draw, or the crop as it is with noise `none`) and the "target" is the pair choice of
  each 2x2 cell for the neighbour sub-sampler, (crop/2, crop/2) int64, drawn by the same
  row generator after the noise.
- A `PairDataset` (real noisy pairs, the pairs schema): input and target are the same
  crop of `noisy_a` and `noisy_b` (swapped at random, both orders are valid Noise2Noise
  pairs); `noise` must be None.

Channels: the model is RGB. Grey images are noised in one channel and then replicated
to 3 channels, so the three channels carry identical noise, exactly like a real noisy
grey photo replicated for the RGB model at inference. Alpha is ignored for training.

Images smaller than the crop are padded by edge replication up to the crop size.
Decoded images are kept in a per-process LRU cache bounded in bytes (as 8/16-bit codes,
not floats). An image that cannot be read or decoded (or a pair whose members differ in
size) is reported once (logged, and listed in `bad`) and replaced deterministically by
the next valid index, so every worker makes the same replacement.
"""
from __future__ import annotations

import collections
import logging

import torch
import torch.nn.functional as F

from n2n_core.neighbor import draw_pairs
from pipeline.data.datasets import ImageDataset, PairDataset
from pipeline.data.records import BadRecordError
from pipeline.data.images import DEFAULT_MAX_PIXELS, BadImageError, codes_to_unit, decode_codes
from pipeline.storage.names import printable

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, step: int, position: int) -> int:
    """A 63-bit seed mixed from (seed, step, position); distinct inputs give unrelated streams."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (step & _MASK64))
    h = _splitmix64(h ^ (position & _MASK64))
    return h >> 1


def row_generator(seed: int, step: int, position: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(row_seed(seed, step, position))
    return g


def shard_positions(batch_size: int, num_workers: int, worker: int) -> range:
    """Contiguous positions of `worker` among `num_workers` (sizes differ by at most one)."""
    if num_workers < 1 or not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} out of range for {num_workers} workers")
    return range(worker * batch_size // num_workers, (worker + 1) * batch_size // num_workers)


def _randint(high: int, g: torch.Generator) -> int:
    return int(torch.randint(0, high, (1,), generator=g))


class TrainingBatches:
    """Deterministic, shardable batches of (input, target) patches.

    Args:
        dataset: ImageDataset of clean images, or PairDataset of real noisy pairs.
        noise: a NoiseModel (pipeline.data.noise), or None with a PairDataset.
        crop_size: side of the square crops.
        batch_size: rows of the global batch (positions 0 .. batch_size - 1).
        seed: the run's seed.
        target: "noisy" (Noise2Noise) or "clean" (supervised).
        augment: random flips and 90-degree rotations.
        cache_bytes: bound of the decoded-image cache (per process).
        holdout: images held out of training (`holdout_indices`), the validation set.

    Shape:
        batch(step, positions) -> (inputs, targets), each (len(positions), 3, crop, crop) float32
        (target "neighbor": targets are the pair choices, (len(positions), crop/2, crop/2) int64).
    """

    def __init__(self, dataset, noise, *, crop_size: int = 64, batch_size: int = 16, seed: int = 0,
                 target: str = "noisy", augment: bool = True, cache_bytes: int = 512 << 20,
                 max_pixels: int = DEFAULT_MAX_PIXELS, holdout: int = 0):
        if target not in ("noisy", "clean", "neighbor"):
            raise ValueError(f"target must be 'noisy', 'clean' or 'neighbor', got {target!r}")
        if target == "neighbor" and crop_size % 2:
            raise ValueError(f"target 'neighbor' needs an even crop size, got {crop_size}")
        self.pairs = isinstance(dataset, PairDataset)
        if self.pairs and (noise is not None or target != "noisy"):
            raise ValueError("a PairDataset brings its own noise: pass noise=None and target='noisy'")
        if not self.pairs and noise is None:
            raise ValueError("a clean-image dataset needs a noise model")
        if len(dataset) == 0:
            raise ValueError("empty dataset")
        if not 0 <= holdout < len(dataset):
            raise ValueError(f"holdout must be at least 0 and fewer than the {len(dataset)} images, got {holdout}")
        self.held_out = holdout_indices(len(dataset), holdout)
        self.dataset, self.noise = dataset, noise
        self.crop_size, self.batch_size, self.seed = crop_size, batch_size, seed
        self.target, self.augment = target, augment
        self.cache_bytes, self.max_pixels = cache_bytes, max_pixels
        self.bad: dict[int, str] = {}  # dataset index -> "name: reason", reported once
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cached = 0

    def __getstate__(self):  # ship settings, not the cache
        state = dict(self.__dict__)
        state["_cache"], state["_cached"] = collections.OrderedDict(), 0
        return state

    # ------------------------------------------------------------------ images
    def _decode(self, data: bytes, name: str) -> torch.Tensor:
        pixels, _, _ = decode_codes(data, name, max_pixels=self.max_pixels)
        return pixels  # (C, H, W) uint8 (8-bit) or int32 (16-bit) codes

    def _load(self, index: int) -> tuple[torch.Tensor, ...]:
        """Codes of image `index` (one tensor, or two for a pair); raises on bad data."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        if self.pairs:
            a_bytes, b_bytes = self.dataset.read_pair(index)
            name = self.dataset.a.name(index)
            a = self._decode(a_bytes, name)
            b = self._decode(b_bytes, self.dataset.b.name(index))
            if a.shape != b.shape:
                raise BadImageError(name, f"pair members differ in size: {tuple(a.shape)} vs {tuple(b.shape)}")
            item = (a, b)
        else:
            item = (self._decode(self.dataset.read(index), self.dataset.name(index)),)
        self._cache[index] = item
        self._cached += sum(t.numel() * t.element_size() for t in item)
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= sum(t.numel() * t.element_size() for t in old)
        return item

    def _valid(self, index: int, skip: frozenset = frozenset()) -> tuple[int, tuple[torch.Tensor, ...]]:
        """The image at `index`, or the next valid one not in `skip` (wrapping); reports bad images once."""
        n = len(self.dataset)
        for k in range(n):
            i = (index + k) % n
            if i in self.bad or i in skip:
                continue
            try:
                return i, self._load(i)
            except (BadImageError, BadRecordError) as e:
                self.bad[i] = str(e)
                log.warning("skipping bad image %s", printable(str(e)))
        raise RuntimeError(f"no valid image in the dataset ({n} records, all bad: {list(self.bad.values())[:3]} ...)")

    @staticmethod
    def _to_float(codes: torch.Tensor) -> torch.Tensor:
        return codes_to_unit(codes, 8 if codes.dtype == torch.uint8 else 16)

    # ------------------------------------------------------------------ rows
    def _crop(self, images: tuple[torch.Tensor, ...], g: torch.Generator) -> list[torch.Tensor]:
        c = self.crop_size
        _, h, w = images[0].shape
        y = _randint(max(h - c, 0) + 1, g)
        x = _randint(max(w - c, 0) + 1, g)
        k = _randint(4, g) if self.augment else 0
        flip = _randint(2, g) if self.augment else 0
        out = []
        for img in images:
            codes = img[:, y:y + c, x:x + c]  # (C, <=c, <=c) integer codes
            if codes.shape[1] < c or codes.shape[2] < c:  # a small image: padded as floats
                patch = self._to_float(codes)
                pad = (0, c - patch.shape[2], 0, c - patch.shape[1])
                codes = F.pad(patch.unsqueeze(0), pad, mode="replicate")[0]
            # flips and rotations are permutations: done on the codes (a quarter of the bytes of floats),
            # then one conversion writes the contiguous float patch; the same values either way
            if flip:
                codes = codes.flip(-1)
            if k:
                codes = torch.rot90(codes, k, dims=(-2, -1))
            out.append(self._to_float(codes) if not codes.is_floating_point() else codes.contiguous())
        return out

    def row(self, step: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) of one position, each (3, crop, crop) float32."""
        g = row_generator(self.seed, step, position)
        _, images = self._valid(_randint(len(self.dataset), g), self.held_out)
        patches = self._crop(images, g)
        if self.pairs:
            a, b = patches
            if _randint(2, g):
                a, b = b, a
            inp, tgt = a, b
        else:
            clean = patches[0]
            if self.target == "noisy":
                inp, tgt = self.noise.pair(clean, g)
            elif self.target == "neighbor":
                noisy = self.noise.apply(clean, g)
                return noisy.expand(3, -1, -1), draw_pairs([g], self.crop_size, self.crop_size)[0]
            else:
                inp, tgt = self.noise.apply(clean, g), clean
        return inp.expand(3, -1, -1), tgt.expand(3, -1, -1)

    def batch(self, step: int, positions: range | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `positions` (default: all) of the global batch of `step`.

        Shape:
            returns (inputs, targets), each (len(positions), 3, crop, crop) float32 (target
            "neighbor": targets are the rows' pair choices, (len(positions), crop/2, crop/2) int64).
        """
        positions = range(self.batch_size) if positions is None else positions
        if positions and (min(positions) < 0 or max(positions) >= self.batch_size):
            raise ValueError(f"positions {positions} outside the batch of {self.batch_size}")
        c = self.crop_size
        inputs = torch.empty((len(positions), 3, c, c), dtype=torch.float32)
        if self.target == "neighbor":  # each row's pair choices: (n, c/2, c/2) int64
            targets = torch.empty((len(positions), c // 2, c // 2), dtype=torch.int64)
        else:
            targets = torch.empty((len(positions), 3, c, c), dtype=torch.float32)
        for r, p in enumerate(positions):
            inputs[r], targets[r] = self.row(step, p)
        return inputs, targets

    # ------------------------------------------------------------------ validation
    def _validation_items(self, n: int):
        """Up to n (index, codes) for validation: the held-out images when there are any, else
        the first valid images in dataset order; bad images are skipped (and reported once)."""
        if self.held_out:
            out = []
            for j in sorted(self.held_out):
                if len(out) == n:
                    break
                try:
                    out.append((j, self._load(j)))
                except (BadImageError, BadRecordError) as e:
                    if j not in self.bad:
                        self.bad[j] = str(e)
                        log.warning("skipping bad image %s", printable(str(e)))
            return out
        out, seen = [], set()
        i = 0
        while len(out) < n and i < len(self.dataset):
            j, images = self._valid(i)
            if j < i or j in seen:  # wrapped around or repeated: no more valid images
                break
            seen.add(j)
            out.append((j, images))
            i = j + 1
        return out

    def validation_images(self, n: int) -> list[torch.Tensor]:
        """n validation images (the held-out ones, else the first valid ones), (3, H, W) float32 each.

        Clean images for a clean dataset; the `noisy_a` member for a PairDataset.
        """
        return [self._to_float(images[0]).expand(3, -1, -1).contiguous() for _, images in self._validation_items(n)]

    def validation_pairs(self, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(noisy input, reference) for n validation images, each (3, H, W) float32.

        The held-out images when the batches hold some out, else the first valid images.
        Clean datasets: the input is a measurement of the clean image (`noise.clipped()`,
        clipped to [0, 1]) from a generator seeded by (seed, -1, index); the reference is
        clean. PairDataset: (noisy_a, noisy_b).
        """
        out = []
        for j, images in self._validation_items(n):
            if self.pairs:
                a, b = (self._to_float(t).expand(3, -1, -1).contiguous() for t in images)
                out.append((a, b))
            else:
                clean = self._to_float(images[0])
                noisy = self.noise.clipped().apply(clean, row_generator(seed, -1, j))
                out.append((noisy.expand(3, -1, -1).contiguous(), clean.expand(3, -1, -1).contiguous()))
        return out


def holdout_indices(count: int, holdout: int) -> frozenset:
    """`holdout` indices spread evenly over range(count): round down (k + 1/2) count / holdout.

    With the keys sorted (as datasets keep them), the same images are held out on every
    machine; 40 of 400 are every tenth image from the fifth on.
    """
    return frozenset(int((k + 0.5) * count / holdout) for k in range(holdout)) if holdout else frozenset()
