"""Writes the small pickle fixtures the checkpoint readers' unit tests use.

    python3 -m pip install numpy && python3 make_fixtures.py

numpy_arrays_p{2,4,5}.pkl: a dict of numpy arrays pickled by CPython/numpy at protocols 2, 4 and
5, shaped like a `.pdparams` file (`paddle.save` pickles a dict of arrays the same way), covering
byte orders, Fortran order, 0-d and empty arrays and several dtypes.
"""
import os
import pickle

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def arrays():
    a = np.arange(6).reshape(2, 3)
    return {
        "f32": a.astype("<f4"),
        "f32_big_endian": a.astype(">f4"),
        "f64_fortran": np.asfortranarray(a.astype("<f8")),
        "u16": np.array([1, 2, 65535], dtype="<u2"),
        "i64_scalar": np.array(-7, dtype="<i8"),
        "bool": np.array([True, False, True]),
        "f16": np.array([0.5, -2.0], dtype="<f2"),
        "i32_fortran_3d": np.asfortranarray(np.arange(24, dtype="<i4").reshape(2, 3, 4)),
        "u8_empty": np.zeros((0, 5), dtype="u1"),
        "StructuredToParameterName@@": {"f32": "generated_tensor_0"},
    }


def main():
    for protocol in (2, 4, 5):
        with open(os.path.join(HERE, f"numpy_arrays_p{protocol}.pkl"), "wb") as f:
            pickle.dump(arrays(), f, protocol=protocol)


if __name__ == "__main__":
    main()
