"""Image parts of a request into images, within limits. A server must not read arbitrary files or make
requests on a client's behalf: `data:` URLs are taken; `http(s)://` URLs never; local paths (plain or
`file://`) only under the folder `--allow-image-dir` names, resolved (links followed) before the check.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.runtime.preprocess import ImageTooLarge, decode_image

from .protocol import APIError

_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,(.*)$", re.S)


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int = 10 * 2**20
    max_pixels: int = 4096 * 4096
    allow_dir: Path | None = None

    def load(self, url: str, param: str) -> Image.Image:
        """The image an `image_url` names; an APIError (400, or 413 over a limit) naming `param` if not."""
        try:
            return decode_image(self._bytes(url, param), param, self.max_pixels)
        except ImageTooLarge as err:
            raise APIError(413, str(err), param=param) from None
        except MobileVLMError as err:
            raise APIError(400, str(err), param=param) from None

    def _bytes(self, url: str, param: str) -> bytes:
        if url.startswith("data:"):
            found = _DATA_URL.match(url)
            if not found:
                raise APIError(400, f"{param}: expected a data:image/...;base64,... URL", param=param)
            payload = found[1]
            if len(payload) * 3 // 4 > self.max_bytes:
                raise APIError(413, f"{param}: the image is over the {self.max_bytes} bytes allowed", param=param)
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise APIError(400, f"{param}: the data URL is not valid base64", param=param) from None
        scheme = urlparse(url).scheme.lower()
        if scheme in ("http", "https", "ftp"):
            raise APIError(
                400,
                f"{param}: remote image URLs are not fetched by this server; send the image as a data: URL",
                param=param,
            )
        if scheme not in ("", "file"):
            raise APIError(400, f"{param}: {scheme}: URLs are not taken; send the image as a data: URL", param=param)
        if self.allow_dir is None:
            raise APIError(
                400,
                f"{param}: local image paths are refused (start the server with --allow-image-dir DIR to allow files under DIR)",
                param=param,
            )
        path = Path(unquote(urlparse(url).path) if scheme == "file" else url).resolve()
        if not path.is_relative_to(self.allow_dir.resolve()):
            raise APIError(400, f"{param}: {path} is outside --allow-image-dir {self.allow_dir}", param=param)
        if not path.is_file():
            raise APIError(400, f"{param}: {path}: no such image file", param=param)
        if path.stat().st_size > self.max_bytes:
            raise APIError(413, f"{param}: the image is over the {self.max_bytes} bytes allowed", param=param)
        return path.read_bytes()
