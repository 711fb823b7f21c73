-- Schema version 5: the images a build exported beside its application (an ESP32 setup
-- build's merged image, bootloader and partition table, flashed once by wire). The bytes
-- are blobs, kept while a row names them.
CREATE TABLE build_images (
    build_id BIGINT NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    PRIMARY KEY (build_id, name)
);
CREATE INDEX build_images_sha256 ON build_images(sha256);
