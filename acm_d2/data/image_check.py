"""Decode every image of a dataset once, as the model will see it; cache what was found.

:func:`check_image_files` is the image part of :func:`acm_d2.data.validate_coco_instances`.
For every ``file_name`` it checks, and else returns the reason as a string:

* the path stays inside the image folder (after ``..``, absolute names and symlinks are
  resolved) unless ``allow_outside_root``;
* it is a regular file (a folder, FIFO or device would hang or fail the loader);
* the whole image decodes: PNGs and other formats with PIL (``load``, plus PNG checksums),
  JPEGs with libjpeg-turbo in strict mode (``simplejpeg``), which refuses what PIL and OpenCV
  pass silently: a JPEG cut short with an end marker appended decodes there as flat grey rows;
* its pixels survive Detectron2's ``read_image``, which converts with PIL's
  ``convert("RGB")``: 16- or 32-bit integer images (mode ``I;16``, ``I``: 16-bit PNGs, X-ray
  exports) with values outside 0..255 would be clipped to white, and float images (mode ``F``,
  float TIFFs) truncated, so both are refused with the conversion rule to apply (scale 16-bit
  values by 255 / 65535, or window them, and save 8-bit images);
* its size after the EXIF rotation Detectron2 applies, and that EXIF orientation (returned:
  the caller compares the size with the JSON and warns about rotated images).

Results are cached per image folder in ``$ACM_D2_CHECK_CACHE`` (default
``<checkout>/.cache/image_checks``), keyed by the file's resolved path, size, mtime, inode and
a hash of its first, middle and last 4 KiB (the whole file below 12 KiB): a second
registration of the same files decodes nothing and reads 12 KiB of each. Processes that register the same
folder at once (every rank registers the datasets) take a file lock: one decodes, the others
wait and read its results. The cache is replaced atomically.
"""
import hashlib
import json
import logging
import os
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from PIL import Image, UnidentifiedImageError

from .file_lock import exclusive_lock

__all__ = ["MISSING", "check_image_files", "default_check_cache_dir", "inspect_image"]

logger = logging.getLogger(__name__)

#: The result for a file that does not exist.
MISSING = "missing"
#: Bump when the checks change: cached results of older checks are not used.
CHECK_VERSION = 2
# EXIF orientations that swap width and height (Detectron2's read_image applies them).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# PIL modes whose convert("RGB") clips or truncates values outside 0..255.
_WIDE_INTEGER_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_CONVERT_HINT = (
    "convert the images to 8-bit (e.g. 16-bit values x 255 / 65535, or a window of the values "
    "that matter scaled to 0..255) and save them as 8-bit PNG or JPEG"
)

#: (width, height, EXIF orientation 1..8, 1 without one) or what is wrong with the file.
Result = Union[Tuple[int, int, int], str]


def default_check_cache_dir() -> Path:
    """``$ACM_D2_CHECK_CACHE`` if set, else ``<checkout>/.cache/image_checks``."""
    env = os.environ.get("ACM_D2_CHECK_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / ".cache" / "image_checks"


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def _decode_jpeg_strictly(path: str, img: Image.Image) -> None:
    import simplejpeg  # libjpeg-turbo; strict: corrupt data raises instead of a warning

    colorspace = {"L": "GRAY", "CMYK": "CMYK"}.get(img.mode, "RGB")
    with open(path, "rb") as f:
        data = f.read()
    try:
        simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=True)
    except ValueError as e:
        # "N extraneous bytes before marker": padding between segments, common in camera files,
        # which stops libjpeg's strict mode before the pixels; PIL decodes them (as training
        # will). Every other warning (missing or corrupt data) is refused.
        if "extraneous bytes before marker" not in str(e):
            raise
        img.load()


def _clipped_pixels(img: Image.Image) -> Optional[str]:
    """Why ``convert("RGB")`` would not show the pixels of the loaded ``img`` faithfully, or None."""
    if img.mode == "F":
        low, high = img.getextrema()
        return (
            f"is a float image (PIL mode F, values {low:.4g} to {high:.4g}); Detectron2's read_image "
            f"converts it with PIL's convert('RGB'), which truncates every value to an integer in 0..255 "
            f"(0..1 floats become black): {_CONVERT_HINT}"
        )
    if img.mode in _WIDE_INTEGER_MODES:
        low, high = img.getextrema()
        if low < 0 or high > 255:
            return (
                f"is a {16 if img.mode.startswith('I;16') else 32}-bit image (PIL mode {img.mode}, values "
                f"{low} to {high}); Detectron2's read_image converts it with PIL's convert('RGB'), which "
                f"clips every value above 255 to white: {_CONVERT_HINT}"
            )
    return None


def inspect_image(path: Union[str, os.PathLike]) -> Result:
    """(width, height, orientation) of the image at ``path``: its size as Detectron2's
    ``read_image`` returns it (after the EXIF rotation) and the EXIF orientation that rotation
    applied (1, none, without one), or a string saying why the model would not see the image
    faithfully (:data:`MISSING` if there is no file). Decodes the whole image."""
    path = os.fspath(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return MISSING
    except OSError as e:
        return f"cannot be read ({e})"
    if not stat.S_ISREG(info.st_mode):
        return f"is {_file_kind(info.st_mode)}, not a regular file"
    try:
        with Image.open(path) as img:
            width, height, image_format, mode = img.size[0], img.size[1], img.format, img.mode
            try:
                orientation = img.getexif().get(0x0112)
            except Exception:  # noqa: BLE001 - a broken EXIF block: Detectron2 ignores it too
                orientation = None
            if image_format == "JPEG":
                _decode_jpeg_strictly(path, img)
                clipped = None
            else:
                img.load()
                clipped = _clipped_pixels(img)
        if image_format == "PNG":
            with Image.open(path) as img:  # verify() must come right after open: the chunk checksums
                img.verify()
    except UnidentifiedImageError:
        return "is not an image file PIL can read"
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, unreadable: say which
        return f"is not a whole image ({type(e).__name__}: {e})"
    if clipped:
        return clipped
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return width, height, orientation if orientation in range(2, 9) else 1


def _inside(real: str, root_real: str) -> bool:
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


#: Bytes of each of the three blocks (first, middle, last) whose hash keys a file in the cache.
SIGNATURE_BLOCK = 4096


def _signature(real: str):
    """[size, mtime, inode, SHA-256 of the first, middle and last :data:`SIGNATURE_BLOCK` bytes
    (the whole file if it is smaller than three)]: a file rewritten in place with its size and
    mtime kept is decoded again when the change touches those blocks."""
    try:
        info = os.stat(real)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block: never opened (inspect_image names it)
            return [info.st_size, info.st_mtime_ns, info.st_ino, None]
        digest = hashlib.sha256()
        with open(real, "rb") as f:
            if info.st_size <= 3 * SIGNATURE_BLOCK:
                digest.update(f.read())
            else:
                for offset in (0, (info.st_size - SIGNATURE_BLOCK) // 2, info.st_size - SIGNATURE_BLOCK):
                    f.seek(offset)
                    digest.update(f.read(SIGNATURE_BLOCK))
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns, info.st_ino, digest.hexdigest()]


def _read_cache(cache_file: Path) -> Dict[str, list]:
    try:
        with open(cache_file) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("Ignoring the unreadable image-check cache %s: %s", cache_file, e)
        return {}
    if not isinstance(data, dict) or data.get("version") != CHECK_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _write_cache(cache_file: Path, root_real: str, files: Dict[str, list]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{cache_file.name}.", suffix=".tmp", dir=cache_file.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": CHECK_VERSION, "image_root": root_real, "files": files}, f)
        os.replace(tmp, cache_file)  # atomic: readers see the old or the new cache
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _decode_all(paths: Dict[str, str], cached: Dict[str, list]) -> Tuple[Dict[str, Result], Dict[str, list], int]:
    """Results by real path (from the cache where the signature matches), the new cache, how many decoded."""
    results: Dict[str, Result] = {}
    todo = []
    for real in set(paths.values()):
        signature = _signature(real)
        entry = cached.get(real)
        if signature is not None and isinstance(entry, list) and len(entry) == 2 and entry[0] == signature:
            results[real] = tuple(entry[1]) if isinstance(entry[1], list) else entry[1]
        else:
            todo.append((real, signature))
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL and libjpeg-turbo release the GIL
        for (real, _), result in zip(todo, pool.map(lambda item: inspect_image(item[0]), todo)):
            results[real] = result
    new_cache = dict(cached)
    for real, signature in todo:
        if signature is not None and results[real] != MISSING:
            result = results[real]
            new_cache[real] = [signature, list(result) if isinstance(result, tuple) else result]
    return results, new_cache, len(todo)


def check_image_files(
    image_root: Union[str, os.PathLike], file_names: Dict[int, str], allow_outside_root: bool = False,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> Dict[int, Result]:
    """Check the image files ``file_names`` (image id -> ``file_name``) under ``image_root``.

    Returns, by image id, (width, height, orientation) after the EXIF rotation or a string saying what is
    wrong (:data:`MISSING`, outside the folder, not a regular file, not whole, clipped by the
    reader); see the module docstring. Uses the cache in ``cache_dir`` (default
    :func:`default_check_cache_dir`); without a writable cache folder every image is decoded.
    """
    root_real = os.path.realpath(os.fspath(image_root))
    outcome: Dict[int, Result] = {}
    paths: Dict[int, str] = {}
    for image_id, name in file_names.items():
        try:
            real = os.path.realpath(os.path.join(root_real, name))
        except (ValueError, OSError) as e:  # a NUL byte, a symlink loop
            outcome[image_id] = f"is not a usable path ({e})"
            continue
        if not allow_outside_root and not _inside(real, root_real):
            outcome[image_id] = (
                f"is outside the image folder {root_real} (it resolves to {real}: an absolute file_name, '..' "
                f"or a symlink); move it under the folder, or allow it with DATASETS.COCO_ALLOW_OUTSIDE_ROOT True "
                f"(register_coco_format_dataset(..., allow_outside_root=True))"
            )
        else:
            paths[image_id] = real
    cache_folder = Path(cache_dir) if cache_dir is not None else default_check_cache_dir()
    cache_file = cache_folder / (hashlib.sha256(root_real.encode()).hexdigest()[:20] + ".json")
    try:
        with exclusive_lock(cache_file.with_suffix(".lock"), f"the image checks of {root_real}"):
            results, new_cache, decoded = _decode_all(paths, _read_cache(cache_file))
            if decoded:
                _write_cache(cache_file, root_real, new_cache)
    except OSError as e:  # no writable cache folder: check without it
        logger.warning("Image-check cache %s not usable (%s): decoding every image", cache_folder, e)
        results, _, decoded = _decode_all(paths, {})
    logger.info("Checked %d images under %s (%d decoded, %d from the cache)", len(paths), root_real, decoded, len(set(paths.values())) - decoded)
    outcome.update({image_id: results[real] for image_id, real in paths.items()})
    return outcome
