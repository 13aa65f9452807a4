"""Data sources (synthetic, folders, voc), the prepared manifest and the training Dataset."""
