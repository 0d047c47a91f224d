"""Small helpers shared by the test modules."""

import h5py


def save_legacy_h5(model, path):
    """Write `model`'s weights in the legacy HDF5 layout of keras.applications' published
    downloads (and tf.keras 2.x save_weights): attrs layer_names / weight_names."""
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
