-- Schema version 11: releases. A group and a rollout hold, besides their firmware, the
-- firmware for devices of other families (a JSON array of firmware ids, one per family).
ALTER TABLE device_groups ADD COLUMN other_firmware TEXT NOT NULL DEFAULT '[]';
ALTER TABLE rollouts ADD COLUMN other_firmware TEXT NOT NULL DEFAULT '[]';
