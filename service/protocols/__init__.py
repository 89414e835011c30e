"""Wire formats: each module decodes requests to arrays and encodes arrays to responses."""
