"""Data: shard formats, converters' shared writing code, TFRecord reading, decoding and loading.

Modules (import the one you need; this package imports nothing so that `import video_ens.data` stays cheap and the
model code never pulls in WebDataset or a video decoder):

    schema.py     sample layout of each dataset kind, `_info.json`, typed decoding of samples, YouTube-8M dequantize
    writer.py     atomic dataset folders of WebDataset shards; the converters' worker pool that survives crashes
    convert_kinetics.py, convert_yt8m.py, convert_images.py   raw datasets -> shards (tools/convert_*.py call them)
    encode.py     the one H.264 encoder (converter re-encodes, demo clips, benchmark videos)
    demo.py       the demo datasets, made through the converters (tools/make_demo_data.py)
    tfrecord.py   TFRecord reading/writing with CRC-32C checks and tf.train protobuf parsing, without TensorFlow
    decode.py     decoding frames from encoded clips (whole, or straight into a caller's buffer)
    transforms.py clip and image transforms: clip parameters drawn in the loader, pixels worked on the device
    samples.py    one shard sample into model inputs, per kind; bad-sample and decoding accounting
    sources.py    what data.train_shards / val_shards name: shard lists, `_info.json`, fit to the model
    loader.py     WebDataset training and evaluation streams over the shards, their workers and hand-over
    remote.py     shards and _info.json from `pipe:` commands and http(s) URLs, with read timeouts
"""
