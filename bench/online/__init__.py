"""The online benchmark: modelserve over HTTP against the raw model call and peer servers."""
