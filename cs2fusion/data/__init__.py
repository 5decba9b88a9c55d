"""Data: finding and validating registered IR/visible pairs, shards, and the impaired-view augmentation."""
