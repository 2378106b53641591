"""fastneg: contrastive learning with non-semantic negatives at GPU speed."""
