"""A synchronous Python client for Kiln, with the calls of Xinference's `xinference.client.Client`.

Code written against Xinference's client ports by changing the import: the same method names, defaults and wire
format (generation `kwargs` travel as a JSON string, multipart bodies name their image fields as Xinference does).
Two things differ on purpose: errors raise `KilnError`, a `RuntimeError` that keeps the HTTP status and the
server's own message, and `size` defaults to None so the server applies the model's default size.
"""

from __future__ import annotations

import base64
import json
import time
from os import PathLike
from typing import Any, Callable, Mapping, Sequence, Union

import httpx

ImageInput = Union[bytes, str, PathLike]
"""An image to upload: its encoded bytes, or the path of an image file."""

FilePart = tuple[str, tuple[str, bytes, str]]


def wait_until_serving(endpoint: str, timeout: float, starting: Callable[[], bool] = lambda: True) -> bool:
    """Poll `GET /status` until the server at `endpoint` answers 200 (True), or `starting()` turns false (its
    process exited) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and starting():
        try:
            if httpx.get(f"{endpoint.rstrip('/')}/status", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


class KilnError(RuntimeError):
    """A non-2xx answer from the server, with its status code and the server's message."""

    def __init__(self, action: str, status_code: int, detail: str):
        super().__init__(f"Failed to {action}: {status_code} {detail}")
        self.status_code = status_code
        self.detail = detail


def _server_message(response: httpx.Response) -> str:
    """The error message from Kiln's body (`detail` or `error.message`), else the raw text or reason."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    if isinstance(body, dict):
        if isinstance(body.get("detail"), str):
            return body["detail"]
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return json.dumps(body)


def _checked(response: httpx.Response, action: str) -> httpx.Response:
    """Raise KilnError unless the response is 2xx, so every call fails the same way."""
    if not response.is_success:
        raise KilnError(action, response.status_code, _server_message(response))
    return response


def _read_image(image: ImageInput) -> bytes:
    """Accept bytes or a file path, like Xinference's handles do."""
    if isinstance(image, bytes):
        return image
    with open(image, "rb") as file:
        return file.read()


def _image_part(field: str, filename: str, image: ImageInput) -> FilePart:
    """One multipart file part, sent as octet-stream like Xinference's client (the server sniffs the format)."""
    return (field, (filename, _read_image(image), "application/octet-stream"))


def _as_list(image: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image or a list of them, as a non-empty list."""
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise ValueError("Image list cannot be empty")
    return images


def _drop_none(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Omit unset fields so the server applies its defaults instead of seeing nulls."""
    return {key: value for key, value in fields.items() if value is not None}


class ImageModelHandle:
    """Calls on one launched image model, as Xinference's `RESTfulImageModelHandle`."""

    def __init__(self, client: Client, model_uid: str):
        self._client = client
        self.model_uid = model_uid

    def text_to_image(
        self,
        prompt: str | list[str],
        n: int = 1,
        size: str | None = None,
        response_format: str = "url",
        **kwargs: Any,
    ) -> dict:
        """POST /v1/images/generations; generation parameters go in `kwargs`, JSON-encoded as Xinference sends."""
        body = _drop_none(
            {"model": self.model_uid, "prompt": prompt, "n": n, "size": size, "response_format": response_format}
        )
        body["kwargs"] = json.dumps(kwargs)
        return self._client.request("POST", "/v1/images/generations", "generate image", json=body).json()

    def image_to_image(
        self,
        image: ImageInput | Sequence[ImageInput],
        prompt: str | None = None,
        negative_prompt: str | None = None,
        n: int = 1,
        size: str | None = None,
        response_format: str = "url",
        **kwargs: Any,
    ) -> dict:
        """POST /v1/images/variations; every image goes under the field `image`."""
        fields = {"prompt": prompt, "negative_prompt": negative_prompt, "n": n, "size": size,
                  "response_format": response_format}
        files = [_image_part("image", "image", item) for item in _as_list(image)]
        return self._multipart("/v1/images/variations", "vary image", fields, files, kwargs)

    def inpainting(
        self,
        image: ImageInput,
        mask_image: ImageInput,
        prompt: str,
        negative_prompt: str | None = None,
        n: int = 1,
        size: str | None = None,
        response_format: str = "url",
        **kwargs: Any,
    ) -> dict:
        """POST /v1/images/inpainting; white pixels of `mask_image` are repainted."""
        fields = {"prompt": prompt, "negative_prompt": negative_prompt, "n": n, "size": size,
                  "response_format": response_format}
        files = [_image_part("image", "image", image), _image_part("mask_image", "mask_image", mask_image)]
        return self._multipart("/v1/images/inpainting", "inpaint image", fields, files, kwargs)

    def image_edit(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompt: str,
        mask: ImageInput | None = None,
        n: int = 1,
        size: str | None = None,
        response_format: str = "url",
        **kwargs: Any,
    ) -> dict:
        """POST /v1/images/edits (OpenAI's edit): with a mask it inpaints, without it runs image-to-image.

        One image goes as the field `image`, several as repeated `image[]` named image_0, image_1, ...
        """
        listed = _as_list(images)
        if len(listed) == 1:
            files = [_image_part("image", "image", listed[0])]
        else:
            files = [_image_part("image[]", f"image_{i}", item) for i, item in enumerate(listed)]
        if mask is not None:
            files.append(_image_part("mask", "mask", mask))
        fields = {"prompt": prompt, "n": n, "size": size, "response_format": response_format}
        return self._multipart("/v1/images/edits", "edit image", fields, files, kwargs)

    def ocr(self, image: ImageInput, **kwargs: Any) -> Any:
        """POST /v1/images/ocr; returns the parsed body (the text, or a dict with `kwargs` detail=True)."""
        return self._multipart("/v1/images/ocr", "ocr image", {}, [_image_part("image", "image", image)], kwargs)

    def _multipart(
        self,
        path: str,
        action: str,
        fields: Mapping[str, Any],
        files: list[FilePart],
        kwargs: Mapping[str, Any],
    ) -> Any:
        """Send one multipart request: form fields (unset ones dropped), `kwargs` as JSON, then the files."""
        form = _drop_none({"model": self.model_uid, **fields})
        form["kwargs"] = json.dumps(kwargs)
        parts: list[Any] = [(key, (None, str(value))) for key, value in form.items()] + files
        return self._client.request("POST", path, action, files=parts).json()


class Client:
    """A Kiln (or Xinference) server at `base_url`. Usable as a context manager to close its connections."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- model management -------------------------------------------------------------------------------------
    def launch_model(
        self,
        model_name: str,
        model_type: str = "image",
        model_uid: str | None = None,
        model_path: str | None = None,
        wait_ready: bool = True,
        **kwargs: Any,
    ) -> str:
        """POST /v1/models; launch options (`cpu_offload`, `tiny`, ...) are top-level keys. Returns the uid.

        With wait_ready=False the server answers at once and loads in the background; poll `describe_model`.
        """
        body = {"model_name": model_name, "model_type": model_type, "model_uid": model_uid, "model_path": model_path}
        body.update(kwargs)
        params = {} if wait_ready else {"wait_ready": "false"}
        response = self.request("POST", "/v1/models", "launch model", json=body, params=params)
        return response.json()["model_uid"]

    def list_models(self) -> dict[str, dict]:
        """Running models as {uid: description}, as Xinference's client returns them."""
        data = self.request("GET", "/v1/models", "list models").json()["data"]
        return {item["id"]: item for item in data}

    def describe_model(self, model_uid: str) -> dict:
        return self.request("GET", f"/v1/models/{model_uid}", "describe model").json()

    def get_model(self, model_uid: str) -> ImageModelHandle:
        """A handle for calling the model; the description's `model_type` picks the handle class."""
        description = self.describe_model(model_uid)
        if description.get("model_type") != "image":
            raise ValueError(f"Unknown model type: {description.get('model_type')}")
        return ImageModelHandle(self, model_uid)

    def terminate_model(self, model_uid: str) -> None:
        self.request("DELETE", f"/v1/models/{model_uid}", "terminate model")

    def get_launch_model_progress(self, model_uid: str) -> dict:
        """{"progress": 0..1} of a launch (the load stages done)."""
        return self.request("GET", f"/v1/models/{model_uid}/progress", "get launch progress").json()

    def cancel_launch_model(self, model_uid: str) -> None:
        """Cancel a launch under way; its uid is free at once."""
        self.request("POST", f"/v1/models/{model_uid}/cancel", "cancel launch")

    def get_instance_info(self, model_name: str | None = None, model_uid: str | None = None) -> list[dict]:
        """Instance records (status CREATING, LOADING, READY, ERROR, TERMINATING, TERMINATED)."""
        params = _drop_none({"model_name": model_name, "model_uid": model_uid})
        return self.request("GET", "/v1/models/instances", "get instance info", params=params).json()

    # --- registrations ----------------------------------------------------------------------------------------
    def register_model(self, model_type: str, model: str | Mapping[str, Any], persist: bool = False) -> None:
        """Register a custom model from its spec (a JSON string, as Xinference's client sends, or a dict)."""
        body = {"model": model if isinstance(model, str) else json.dumps(model), "persist": persist}
        self.request("POST", f"/v1/model_registrations/{model_type}", "register model", json=body)

    def unregister_model(self, model_type: str, model_name: str) -> None:
        self.request("DELETE", f"/v1/model_registrations/{model_type}/{model_name}", "unregister model")

    def list_model_registrations(self, model_type: str = "image", detailed: bool = False) -> list[dict]:
        params = {"detailed": "true"} if detailed else {}
        return self.request("GET", f"/v1/model_registrations/{model_type}", "list model registrations",
                            params=params).json()

    # --- requests ---------------------------------------------------------------------------------------------
    def abort_request(self, model_uid: str, request_id: str, block_duration: int = 30) -> dict:
        """Abort a request sent with `request_id`; it then fails with 409. Returns {"msg": DONE|NO_OP|NOT_FOUND}."""
        path = f"/v1/models/{model_uid}/requests/{request_id}/abort"
        return self.request("POST", path, "abort request", json={"block_duration": block_duration}).json()

    def get_progress(self, request_id: str) -> dict:
        """{"progress": 0..1} of a request sent with `request_id`."""
        return self.request("GET", f"/v1/requests/{request_id}/progress", "get progress").json()

    def image_bytes(self, item: Mapping[str, Any]) -> bytes:
        """The encoded image of one response data item: decoded from `b64_json`, else downloaded from `url`."""
        if item.get("b64_json"):
            return base64.b64decode(item["b64_json"])
        if item.get("url"):
            return self.request("GET", item["url"], "download image").content
        raise ValueError("response item has neither b64_json nor url")

    def request(self, method: str, url: str, action: str, **kwargs: Any) -> httpx.Response:
        """Send one call (url relative to base_url, or absolute); KilnError "Failed to <action>: ..." unless 2xx."""
        return _checked(self._http.request(method, url, **kwargs), action)
