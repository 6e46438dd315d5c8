"""Image transforms, all from timm: the DeiT train recipe and the standard resize + center-crop eval."""

from timm.data import create_transform


def build_transform(cfg, is_train: bool):
    d, a = cfg.DATA, cfg.AUG
    if is_train:
        return create_transform(
            input_size=d.TRAIN_CROP_SIZE, is_training=True, scale=tuple(a.SCALE), hflip=a.HFLIP,
            color_jitter=a.COLOR_JITTER if a.ENABLE else 0.0,
            auto_augment=(a.AA_TYPE or None) if a.ENABLE else None,
            interpolation=d.INTERPOLATION, mean=tuple(d.MEAN), std=tuple(d.STD),
            re_prob=a.RE_PROB if a.ENABLE else 0.0, re_mode=a.RE_MODE, re_count=a.RE_COUNT)
    # Short side to TEST_CROP_SIZE / IN_VAL_CROP_RATIO (DeiT: 256 for 224), then the center crop.
    return create_transform(input_size=d.TEST_CROP_SIZE, is_training=False, interpolation=d.INTERPOLATION,
                            crop_pct=d.IN_VAL_CROP_RATIO, mean=tuple(d.MEAN), std=tuple(d.STD))
