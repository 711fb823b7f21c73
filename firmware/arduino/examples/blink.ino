// Blink: the board's LED on for half a second, off for half a second.
// ESP32 Dev Module has no LED_BUILTIN; most of its boards have the LED on GPIO2.
#ifndef LED_BUILTIN
#define LED_BUILTIN 2
#endif

void setup() {
  pinMode(LED_BUILTIN, OUTPUT);
}

void loop() {
  digitalWrite(LED_BUILTIN, HIGH);
  delay(500);
  digitalWrite(LED_BUILTIN, LOW);
  delay(500);
}
