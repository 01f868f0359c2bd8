"""A local package shipped into the image with add_local_python_source."""


def greeting(name: str) -> str:
    return f"hello, {name}"
