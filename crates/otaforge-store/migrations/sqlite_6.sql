-- Schema version 6: what a Linux device reports about itself (hawkBit configData, Mender
-- inventory), as one JSON object; NULL until it first reports.
ALTER TABLE devices ADD COLUMN attributes TEXT;
