"""The C kernels' build cache is keyed on everything the compiler reads from the package, headers included."""

from qwen3dbg.util.cbuild import build


def test_editing_a_header_the_kernel_includes_builds_it_anew(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN3DBG_HOME", str(tmp_path / "home"))
    header, source = tmp_path / "value.h", tmp_path / "kernel.c"
    source.write_text('#include "value.h"\nint value(void) { return VALUE; }\n')
    flags = ["-O1", "-fPIC", "-shared"]
    header.write_text("#define VALUE 1\n")
    assert build("value", source, flags, "a test kernel").value() == 1
    header.write_text("#define VALUE 2\n")
    assert build("value", source, flags, "a test kernel").value() == 2
