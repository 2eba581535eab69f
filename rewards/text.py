"""Text rewards beyond sentiment: embedding similarity, classifiers, answer checking, length penalties."""
