-- Schema version 16: a second cache generation for writes that change many device rows at
-- once (imports, bulk changes, deleting a group or a product). Row 1 now covers what check-ins
-- read besides devices, so that a group renamed does not make every process load a million
-- devices again; row 2 makes them forget the devices too.
INSERT INTO cache_generation (id, n) VALUES (2, 0);
