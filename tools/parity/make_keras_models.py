#!/usr/bin/env python
"""Make the five SynthSeg .h5 weight files with the ORIGINAL Keras builders and seeded random weights.

Runs in the TensorFlow venv made by ``setup_tf_env.sh``:

    .parity/venv/bin/python tools/parity/make_keras_models.py --script .parity/mri_synthseg \
        --out .parity/models --seed 0 \
        --calib-image .parity/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz

The real FreeSurfer weights are not available here, so each network is built exactly as the
script's ``build_model`` builds it (see ``keras_forward.build_network``) and given weights that make
a comparison meaningful (outputs far from uniform, every layer exercised):

* conv kernels Glorot-uniform, conv biases U(-0.1, 0.1), BatchNorm gamma U(0.8, 1.2) and beta
  U(-0.1, 0.1), all from ``numpy.random.default_rng([seed, <net index>])``;
* every BatchNorm's moving mean/variance calibrated by one training-mode forward pass (momentum 0,
  so the moving statistics become the batch statistics) on a real preprocessed input: the MNI T1
  through the script's own ``preprocess`` (0.5/99.5 percentile rescaling, centre crop to
  ``--calib-size``) for v1/v2/robust; the same T1 plus the one-hot of (MNI grey matter > 0.5) for
  the parcellation net; the one-hot QC labels of a real training label map (RAS, 2x subsampled,
  generation -> segmentation -> QC labels as build_model maps them) for QC. Cascade stages are fed
  what they would see (the robust net is calibrated through the whole cascade, argmax/one-hot
  included, stage by stage);
* each ``*_likelihood`` 1x1x1 conv is then shifted so every class has mean logit 0 on the
  calibration input and scaled so the per-voxel std of the logits across classes is
  ``--logit-std`` (3) (stage by stage for the cascade, the BatchNorms after it recalibrated);
* the QC head's last conv (qc_final_conv_1) is rescaled/shifted so that, per QC class, its
  pre-activation has spatial std 0.2 around a mean drawn from U(0.3, 0.7): the QC outputs (spatial
  means of its ReLU) lie inside [0, 1] for a realistic input.

Each network is saved with Keras ``model.save_weights(path)`` (HDF5). All the ``.npy`` label
files are copied next to them, so ``--out`` is a complete FreeSurfer-style ``models/`` folder;
``keras_param_counts.json`` lists ``count_params()`` and the layers with weights per file.
A final self-check builds the script's full pipelines (2.0 + flip + parcellation + QC, and robust
+ parcellation + QC) through ``build_model``, which loads these files itself, and verifies every
layer with weights received exactly the saved values.
"""
import argparse
import gc
import glob
import json
import os
import shutil
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import keras_forward as kf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(HERE))
SHARED = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'synthseg')
NET_INDEX = {'v1': 1, 'v2': 2, 'robust': 3, 'parc': 4, 'qc': 5}


def log(*a):
    print('[make_keras_models]', *a, flush=True)


# ----------------------------------------------------------------------------------------------
# calibration inputs
# ----------------------------------------------------------------------------------------------
def calibration_inputs(m, labels, args):
    size = [args.calib_size] * 3
    # the script's own preprocessing: RAS alignment, centre crop, percentile rescaling, padding
    image = m.preprocess(path_image=args.calib_image, crop=size, min_pad=size)[0]
    image = image.astype(np.float32)
    gm = m.preprocess(path_image=args.calib_gm, crop=size, min_pad=size)[0][..., 0]
    cortex = (gm > 0.5).astype(np.int32)
    parc_in = np.concatenate([image, np.eye(2, dtype=np.float32)[cortex]], axis=-1)

    # QC: a real label map (generation labels), RAS, 2x subsampled (whole head in view), centre
    # crop/pad; generation -> segmentation labels (synthseg_segmentation_labels.npy is aligned
    # with generation_labels.npy; 2.0 also keeps the CSF, 24); then segmentation -> QC labels
    # -> one-hot, as build_model's QC branch maps them
    lab = m.load_volume(args.calib_labels, dtype='int32', aff_ref=np.eye(4))
    lab = lab[::2, ::2, ::2]
    if any(s > c for s, c in zip(lab.shape, size)):
        lab = m.crop_volume(lab, cropping_shape=[min(s, c) for s, c in zip(lab.shape, size)])
    lab = m.pad_volume(lab, padding_shape=size)
    generation = np.load(os.path.join(args.labels_dir, 'generation_labels.npy'))
    seg_v1 = np.load(os.path.join(args.labels_dir, 'synthseg_segmentation_labels.npy'))
    gen_to_seg = np.zeros(max(int(lab.max()), int(generation.max())) + 1, dtype=np.int32)
    gen_to_seg[generation] = np.where(generation == 24, 24, seg_v1)
    seg_labels = labels['v2']['labels_segmentation']
    seg_to_qc = np.zeros(int(seg_labels.max()) + 1, dtype=np.int32)
    seg_to_qc[seg_labels] = labels['v2']['labels_qc']
    qc_lab = seg_to_qc[gen_to_seg[lab]]
    qc_in = np.eye(labels['n']['qc'], dtype=np.float32)[qc_lab][None]
    log('calibration inputs: image %s (mean %.3f), parc %s (cortex %.1f%%), qc %s '
        '(%d QC classes present)' % (image.shape, image.mean(), parc_in.shape,
                                     100 * cortex.mean(), qc_in.shape, len(np.unique(qc_lab))))
    return {'v1': image, 'v2': image, 'robust': image, 'parc': parc_in, 'qc': qc_in}


# ----------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------
def init_weights(m, model, rng):
    KL = m.KL
    for layer in model.layers:
        if not layer.weights:
            continue
        names = [w.name.split('/')[-1].split(':')[0] for w in layer.weights]
        shapes = [tuple(w.shape) for w in layer.weights]
        if isinstance(layer, KL.Conv3D):
            assert names == ['kernel', 'bias'], (layer.name, names)
            k_shape = shapes[0]
            receptive = int(np.prod(k_shape[:-2]))
            limit = np.sqrt(6.0 / (receptive * k_shape[-2] + receptive * k_shape[-1]))
            kernel = rng.uniform(-limit, limit, size=k_shape)
            bias = rng.uniform(-0.1, 0.1, size=shapes[1])
            layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
        elif isinstance(layer, KL.BatchNormalization):
            assert names == ['gamma', 'beta', 'moving_mean', 'moving_variance'], (layer.name, names)
            c = shapes[0]
            layer.set_weights([rng.uniform(0.8, 1.2, size=c).astype(np.float32),
                               rng.uniform(-0.1, 0.1, size=c).astype(np.float32),
                               np.zeros(c, np.float32), np.ones(c, np.float32)])
        else:
            raise SystemExit('unexpected layer with weights: %s (%s)' % (layer.name, type(layer)))


def calibrate_batchnorms(m, model, tensor, x):
    """One training-mode pass from the model's input to ``tensor`` with BatchNorm momentum 0:
    the moving statistics of every BatchNorm on the way become its batch statistics. Returns the
    number of BatchNorms and the value of ``tensor`` (in training mode, i.e. normalised by the
    biased batch variance instead of the stored unbiased one: a relative difference of 1/(n-1),
    harmless for choosing the head's scale below)."""
    sub = m.keras.Model(inputs=model.inputs, outputs=tensor)
    bns = [layer for layer in sub.layers if isinstance(layer, m.KL.BatchNormalization)]
    saved = [layer.momentum for layer in bns]
    for layer in bns:
        layer.momentum = 0.0
    out = np.asarray(sub(m.tf.constant(x), training=True))
    for layer, mom in zip(bns, saved):
        layer.momentum = mom
    return len(bns), out


def adjust_likelihood(m, model, name, x, target_std):
    """Calibrate the BatchNorms up to ``name``; then centre each class's logit on the
    calibration input and scale the logits' spread."""
    layer = model.get_layer(name)
    n_bn, z = calibrate_batchnorms(m, model, layer.output, x)
    z = z.reshape(-1, z.shape[-1]).astype(np.float64)
    mu = z.mean(axis=0)
    spread = (z - mu).std(axis=-1).mean()
    scale = target_std / spread
    kernel, bias = layer.get_weights()
    layer.set_weights([(kernel * scale).astype(np.float32),
                       ((bias - mu) * scale).astype(np.float32)])
    return n_bn, spread, scale


def adjust_qc_head(m, model, x, rng, std=0.2, lo=0.3, hi=0.7):
    """Per QC class: pre-activation of qc_final_conv_1 ~ spatial std `std` around U(lo, hi)."""
    tf = m.tf
    layer = model.get_layer('qc_final_conv_1')
    n_bn, h = calibrate_batchnorms(m, model, layer.input, x)
    kernel, bias = layer.get_weights()
    z = tf.nn.conv3d(h, kernel, strides=[1] * 5, padding='SAME').numpy() + bias
    z = z.reshape(-1, z.shape[-1]).astype(np.float64)
    mu, sd = z.mean(axis=0), np.maximum(z.std(axis=0), 1e-6)
    target = rng.uniform(lo, hi, size=mu.shape)
    scale = std / sd
    layer.set_weights([(kernel * scale).astype(np.float32),
                       ((bias - mu) * scale + target).astype(np.float32)])
    return n_bn, target


def summarize(net, out):
    if net == 'qc':
        return 'qc output %s' % np.array2string(np.squeeze(out), precision=3)
    p = out.reshape(-1, out.shape[-1])
    am = p.argmax(-1)
    return 'mean max-prob %.3f, %d/%d labels in argmax' % (p.max(-1).mean(), len(np.unique(am)),
                                                          p.shape[-1])


def make_one(m, net, labels, x, args):
    t0 = time.time()
    rng = np.random.default_rng([args.seed, NET_INDEX[net]])
    model = kf.build_network(m, net, labels, path=None)
    init_weights(m, model, rng)
    # stage by stage: BatchNorms up to the stage's head, then the head (argmax downstream set)
    for name in kf.LIKELIHOOD_LAYERS[net]:
        n_bn, spread, scale = adjust_likelihood(m, model, name, x, args.logit_std)
        log('  %s: %d BatchNorms calibrated; %s logit spread %.4f -> x%.1f' %
            (net, n_bn, name, spread, scale))
    if net == 'qc':
        n_bn, target = adjust_qc_head(m, model, x, rng)
        log('  qc: %d BatchNorms calibrated; head targets %s' %
            (n_bn, np.array2string(target, precision=3)))
    # report on the calibration input, in inference mode
    names = [kf.OUTPUT_LAYER[net]] + (['unet_prediction', 'l2l_prediction'] if net == 'robust'
                                      else [])
    probe = m.keras.Model(inputs=model.inputs, outputs=[model.get_layer(n).output for n in names])
    outs = kf.run(m, probe, x)
    outs = outs if isinstance(outs, list) else [outs]
    for name, o in zip(names, outs):
        log('  %s %s on calibration input: %s' % (net, name, summarize(net, o)))
    path = os.path.join(args.out, kf.MODEL_FILES[net])
    tmp = path + '.tmp.h5'  # then rename: a reader of the old file is not disturbed
    model.save_weights(tmp, save_format='h5')
    os.replace(tmp, path)
    info = {'count_params': int(model.count_params()),
            'layers_with_weights': kf.weighted_layers(model)}
    weights = {layer.name: [w.copy() for w in layer.get_weights()]
               for layer in model.layers if layer.weights}
    log('%s -> %s: %d params, %d layers with weights (%.1f s)' %
        (net, path, info['count_params'], len(info['layers_with_weights']), time.time() - t0))
    del model, probe
    m.keras.backend.clear_session()
    gc.collect()
    return info, weights


def flat_layers(m, model):
    """Layers of a functional model, nested models (the flipped-input branch) expanded."""
    for layer in model.layers:
        if isinstance(layer, m.keras.Model):
            yield from flat_layers(m, layer)
        else:
            yield layer


def self_check(m, labels, args, saved):
    """Build the script's full pipelines via build_model (which loads our files) and compare."""
    p = {net: os.path.join(args.out, f) for net, f in kf.MODEL_FILES.items()}
    for robust in (False, True):
        t0 = time.time()
        net = kf.build_segmentation_pipeline(m, labels, p['robust' if robust else 'v2'], p['parc'],
                                             p['qc'], robust=robust, flip=not robust,
                                             do_parcellation=True, do_qc=True, load=True)
        src = dict(saved['robust' if robust else 'v2'])
        src.update(saved['parc'])
        src.update(saved['qc'])
        seen = set()
        n = 0
        for layer in flat_layers(m, net):
            if not layer.weights:
                continue
            if layer.name not in src:
                raise SystemExit('self-check: build_model layer %s not in our files' % layer.name)
            for a, b in zip(layer.get_weights(), src[layer.name]):
                if a.shape != b.shape or not np.array_equal(a, b):
                    raise SystemExit('self-check: %s differs after build_model loading' % layer.name)
            n += 1
            seen.add(layer.name)
        if seen != set(src):
            raise SystemExit('self-check: %d of our %d layers used by build_model' % (n, len(src)))
        log('self-check ok: build_model(robust=%s, parcellation, qc) loads all %d weighted layers '
            'unchanged, %d params (%.1f s)' % (robust, len(seen), net.count_params(),
                                                time.time() - t0))
        del net
        m.keras.backend.clear_session()
        gc.collect()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--script', required=True, help='path of the extracted mri_synthseg')
    parser.add_argument('--out', required=True, help='models folder to write')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--calib-image', required=True, help='MNI T1 (nifti)')
    parser.add_argument('--calib-gm', default=None,
                        help='grey-matter probability map (default: the calib image path with '
                             '_t1_ replaced by _gm_)')
    parser.add_argument('--calib-labels',
                        default=os.path.join(SHARED, 'training_label_maps', 'training_seg_01.nii.gz'),
                        help='real label map for the QC calibration input')
    parser.add_argument('--labels-dir', default=os.path.join(SHARED, 'labels_classes_priors'),
                        help='folder with the .npy label lists')
    parser.add_argument('--calib-size', type=int, default=96, help='calibration crop (mult. of 32)')
    parser.add_argument('--logit-std', type=float, default=3.0)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--nets', default=','.join(kf.NETS), help='subset, comma-separated')
    parser.add_argument('--no-self-check', action='store_true')
    args = parser.parse_args(argv)
    if args.calib_gm is None:
        args.calib_gm = args.calib_image.replace('_t1_', '_gm_')
    for path in (args.calib_image, args.calib_gm, args.calib_labels, args.labels_dir):
        if not os.path.exists(path):
            raise SystemExit('missing: %s' % path)

    t_all = time.time()
    m = kf.load_script(args.script, args.threads)
    os.makedirs(args.out, exist_ok=True)
    npys = sorted(glob.glob(os.path.join(args.labels_dir, '*.npy')))
    for f in npys:
        dst = os.path.join(args.out, os.path.basename(f))
        if os.path.exists(dst):
            os.remove(dst)
        shutil.copyfile(f, dst)
    log('copied %d .npy label files to %s' % (len(npys), args.out))
    labels = kf.label_info(m, args.out)
    log('label counts: %s' % labels['n'])
    inputs = calibration_inputs(m, labels, args)

    nets = [n for n in args.nets.split(',') if n]
    counts_path = os.path.join(args.out, 'keras_param_counts.json')
    counts = {}
    if os.path.exists(counts_path):
        with open(counts_path) as f:
            counts = json.load(f)
    saved = {}
    for net in nets:
        info, saved[net] = make_one(m, net, labels, inputs[net], args)
        counts[kf.MODEL_FILES[net]] = info
    with open(counts_path, 'w') as f:
        json.dump(counts, f, indent=1)
    log('wrote %s' % counts_path)

    if not args.no_self_check and set(kf.NETS) <= set(nets):
        self_check(m, labels, args, saved)
    log('done in %.1f s' % (time.time() - t_all))


if __name__ == '__main__':
    main()
