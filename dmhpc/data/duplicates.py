"""Images that are exact flips or 90-degree rotations of each other: the augmented copies of one object.

The DeepMerge files hold augmented copies of each merger (flips, rotations) and no object ids, so a
split drawn image by image puts copies of one galaxy in training and in test. Two passes find them:

1. a signature per image, invariant under the 8 symmetries of the square (4 flips when H != W):
   the sum, modulo 2**64, of a mixing function of every pixel's bit pattern. Integer addition is
   exact and order-free, so a flipped or rotated copy has the very same signature. So has any
   rearrangement of the same pixel values (sparse or padded images share one often); other images
   share one with probability about 2**-64 per pair. Either way the next pass tells them apart: a
   shared signature costs hashing, never a wrong group. One cheap pass, a block of rows at a time.
2. within each group of equal signatures, the exact test: the canonical hash of an image is the
   smallest BLAKE2 digest of its symmetric versions, so two images with equal canonical hashes are
   exact symmetric copies. Only images whose signature is shared are hashed this way.
"""

from __future__ import annotations

import hashlib

import numpy as np

_MIX = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: spreads nearby bit patterns apart
_BLOCK_BYTES = 16 << 20


def signatures(images, start: int = 0, stop: int | None = None) -> np.ndarray:
    """(stop - start,) uint64 signatures of images[start:stop], equal for symmetric copies."""
    stop = len(images) if stop is None else stop
    per_image = int(np.prod(images.shape[1:])) * 4
    step = max(1, _BLOCK_BYTES // per_image)
    out = np.empty(stop - start, np.uint64)
    with np.errstate(over="ignore"):
        for a in range(start, stop, step):
            block = np.ascontiguousarray(images[a:min(a + step, stop)], dtype=np.float32)
            bits = block.view(np.uint32).reshape(len(block), -1).astype(np.uint64)
            bits *= _MIX
            bits ^= bits >> np.uint64(29)
            bits *= _MIX
            out[a - start:a - start + len(block)] = bits.sum(axis=1, dtype=np.uint64)
    return out


def _versions(image: np.ndarray):
    """The symmetric versions of one (C, H, W) image: 8 when square, else the 4 flips."""
    square = image.shape[-1] == image.shape[-2]
    for code in range(8 if square else 4):
        v = image[..., ::-1] if code & 1 else image
        v = v[..., ::-1, :] if code & 2 else v
        yield np.ascontiguousarray(v.swapaxes(-1, -2) if code & 4 else v)


def canonical_hash(image: np.ndarray) -> bytes:
    """The smallest digest over the image's symmetric versions: equal exactly for symmetric copies."""
    image = np.asarray(image, dtype=np.float32)
    return min(hashlib.blake2b(v.tobytes(), digest_size=16).digest() for v in _versions(image))


def candidates(sigs: np.ndarray) -> np.ndarray:
    """Ascending indices of the images whose signature another image shares: the only ones the
    exact test (`canonical_hashes`) reads."""
    _, inverse, counts = np.unique(sigs, return_inverse=True, return_counts=True)
    return np.flatnonzero(counts[inverse] > 1)


def canonical_hashes(images, rows: np.ndarray) -> np.ndarray:
    """(len(rows), 16) uint8: the canonical hash of each of images[rows], `rows` ascending."""
    out = np.empty((len(rows), 16), np.uint8)
    # A block at a time: in the DeepMerge files nearly every image has copies, and all of them at
    # once is the whole input.
    step = max(1, _BLOCK_BYTES // (int(np.prod(images.shape[1:])) * 4))
    for a in range(0, len(rows), step):
        block = rows[a:a + step]
        for k, image in enumerate(images[block]):
            out[a + k] = np.frombuffer(canonical_hash(image), np.uint8)
    return out


def objects_from(sigs: np.ndarray, rows: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """(N,) int64 object ids from the candidates' canonical hashes: each image gets the index of the
    first image it is a symmetric copy of (equal signature and canonical hash)."""
    objects = np.arange(len(sigs), dtype=np.int64)
    if not len(rows):
        return objects
    keys = np.concatenate([sigs[rows].view(np.uint8).reshape(-1, 8), hashes], axis=1)
    # np.unique's first occurrences, `rows` ascending: each key's lowest index.
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    objects[rows] = rows[first[inverse.reshape(-1)]]
    return objects


def group(images, sigs: np.ndarray) -> np.ndarray:
    """(N,) int64 object ids of `images` in one process (`dmhpc prepare` shares `canonical_hashes`
    out among its MPI ranks): each image gets the index of the first image it is a copy of."""
    rows = candidates(sigs)
    return objects_from(sigs, rows, canonical_hashes(images, rows))


def count_copies(objects: np.ndarray) -> tuple[int, int]:
    """(images that copy another one, distinct objects those belong to) for object ids from `group`."""
    copies = objects != np.arange(len(objects))
    return int(copies.sum()), int(len(np.unique(objects[copies])))


def join_groupings(groupings: list[np.ndarray]) -> np.ndarray:
    """Object ids from several groupings of paired rows (row i is the same object in each: pristine
    and noisy views of one simulation): rows that are copies in any grouping are one object in all.
    A noisy domain whose copies got their own noise has no exact copies to find; the pristine
    domain's groups then hold for it too. Ids are each group's first row, as `group` gives them."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(groupings[0])
    rows = np.tile(np.arange(n), len(groupings))
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, np.concatenate(groupings))), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    first = np.full(component.max() + 1, n, np.int64)
    np.minimum.at(first, component, np.arange(n))
    return first[component]
